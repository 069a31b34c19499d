"""The gate's decision, the report, and evaluation of several adapters on one base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.evaluate import decide_gate, eval_loss, evaluate_adapters
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora
from lora_ops.report import gate_markdown, plot_loss_curve
from tests.helpers import randomize_adapter

SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"


@pytest.mark.parametrize(
    ("base", "candidate", "production", "passed", "phrase"),
    [
        (3.0, 1.0, None, True, "66.7% below the base's"),
        (3.0, 2.9, None, False, "the gate needs at least 5.0%"),
        (3.0, 1.0, 0.9, False, "worse than production's 0.9000 by more than 2.0%"),
        (3.0, 1.0, 0.99, True, "within 2.0% of production's 0.9900"),
        (3.0, math.nan, None, False, "not finite"),
    ],
    ids=["beats-base", "too-small", "worse-than-prod", "within-tolerance", "diverged"],
)
def test_gate_decision(
    base: float, candidate: float, production: float | None, passed: bool, phrase: str
) -> None:
    gate = decide_gate(base, candidate, production, min_improvement=0.05, production_tolerance=0.02)
    assert gate.passed is passed
    assert phrase in gate.reason


def test_report_has_figures_and_replies(tmp_path: Path) -> None:
    gate = decide_gate(3.5, 0.5, None)
    text = gate_markdown(
        "acme",
        gate,
        [{"prompt": "a|b", "base": "x", "candidate": "y"}],
        run_url="http://mlflow/run",
        version="3",
    )
    assert "# acme: gate passed" in text
    assert "| candidate | 0.5000 |" in text
    assert "a\\|b" in text
    assert "Registered version: 3" in text
    png = plot_loss_curve([3.0, 2.0, 1.0], tmp_path / "curve.png", base_eval_loss=3.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
