"""Held-out loss and the evaluation of several adapters on one base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import chat, data
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora
from lora_ops.training.evaluate import eval_loss, evaluate_adapters
from tests.helpers import randomize_adapter

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"
TOOL_SAMPLE = SAMPLE.with_name("weather-tools.jsonl")


def test_evaluate_adapters_measures_each_on_one_base(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    small = tmp_path / "d.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:12]))
    dataset = data.prepare_dataset(small, tiny_tokenizer, max_seq_len=256, eval_fraction=0.3)
    for seed, name in enumerate(["candidate", "production"]):
        apply_lora(tiny_model, LoraSpec(r=2), adapter=name)
        randomize_adapter(tiny_model, name, seed=seed)
    pad = tiny_tokenizer.pad_token_id
    prompts = [data.prompt_of(e) for e in data.read_examples(small)[:2]]
    result = evaluate_adapters(
        tiny_model, tiny_tokenizer, dataset.eval, prompts, has_production=True, max_new_tokens=3
    )
    with adapters_in_use(tiny_model, "production"):
        assert result.production_loss == pytest.approx(eval_loss(tiny_model, dataset.eval, pad))
    with adapters_in_use(tiny_model, None):
        assert result.base_loss == pytest.approx(eval_loss(tiny_model, dataset.eval, pad))
    assert len({result.base_loss, result.candidate_loss, result.production_loss}) == 3
    assert [set(row) for row in result.generations] == [{"prompt", "base", "candidate"}] * 2


def test_evaluation_offers_a_tool_prompt_its_tools(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    small = tmp_path / "tools.jsonl"
    small.write_text("".join(TOOL_SAMPLE.read_text().splitlines(keepends=True)[:12]))
    dataset = data.prepare_dataset(small, tiny_tokenizer, max_seq_len=512, eval_fraction=0.3)
    apply_lora(tiny_model, LoraSpec(r=2), adapter="candidate")
    examples = data.read_examples(small)[:2]
    rendered: list[tuple[list[Any], list[Any] | None]] = []
    real_render = chat.render_chat

    def recording(tokenizer: Any, messages: Any, tools: Any = None, **kwargs: Any) -> str:
        rendered.append((list(messages), tools))
        return real_render(tokenizer, messages, tools, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat, "render_chat", recording)
        result = evaluate_adapters(
            tiny_model,
            tiny_tokenizer,
            dataset.eval,
            [data.prompt_of(e) for e in examples],
            has_production=False,
            max_new_tokens=3,
            tools=[list(e.tools) for e in examples],
        )

    assert [row["prompt"] for row in result.generations] == [
        data.prompt_of(e)[-1]["content"] for e in examples
    ]
    assert rendered == [(data.prompt_of(e), list(e.tools)) for e in examples for _ in range(2)]
