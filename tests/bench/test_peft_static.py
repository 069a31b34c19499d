"""The PEFT static-batch baseline answers each row as PEFT answers it alone, and streams."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from lora_ops import base_models
from lora_ops.errors import InputError
from lora_ops.generation import GenerationResult, SamplingParams, TokenCallback
from lora_ops.lora import LoraSpec

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from baselines.peft_static import PeftStaticConfig, PeftStaticEngine  # noqa: E402
from common import write_random_adapters  # noqa: E402

# A large alpha over rank 4: adapters of random 0.02 weights change tiny-llama's greedy
# answers, so a row served through the wrong adapter shows.
ADAPTER_SPEC = LoraSpec(r=4, alpha=128, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
ADAPTERS = ("customer-a", "customer-b")


@pytest.fixture(scope="module")
def adapter_folders(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: root / name for name in ADAPTERS}
    write_random_adapters(tiny_base, list(folders.values()), ADAPTER_SPEC)
    return folders


@pytest.fixture(scope="module")
def engine(tiny_base: Path, adapter_folders: dict[str, Path]) -> Iterator[PeftStaticEngine]:
    # A long window: the three requests of a test must meet in one batch on a busy machine.
    config = PeftStaticConfig(
        tiny_base, adapter_folders, max_batch_size=4, batch_window_s=0.5, device="cpu"
    )
    served = PeftStaticEngine(config)
    yield served
    served.close()


def alone(model: PreTrainedModel | PeftModel, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one prompt in a batch of one, as a PEFT user would generate them."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def reference_model(base: Path, adapter: Path | None) -> PreTrainedModel | PeftModel:
    model = base_models.load_model(base, "cpu")
    if adapter is None:
        return model
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def test_a_static_batch_answers_every_row_as_alone(
    engine: PeftStaticEngine, tiny_base: Path, adapter_folders: dict[str, Path]
) -> None:
    questions = ["Where is my order?", "How do I reset my password, please?", "1 2 3 4"]
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # unequal lengths: rows are padded
    cases = [("customer-a", 5, True), ("customer-b", 8, False), ("base", 3, True)]
    events: list[tuple[str, int]] = []
    pieces: dict[int, list[str]] = {i: [] for i in range(len(cases))}

    def listener(index: int) -> TokenCallback:
        def on_text(_: int, piece: str) -> None:
            events.append(("text", index))
            pieces[index].append(piece)

        return on_text

    def finished(index: int) -> Callable[[Future[GenerationResult]], None]:
        def done(_: Future[GenerationResult]) -> None:
            events.append(("done", index))

        return done

    futures = []
    for index, (prompt, (model, max_tokens, ignore_eos)) in enumerate(
        zip(prompts, cases, strict=True)
    ):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        future = engine.submit(prompt, model, params, on_text=listener(index))
        future.add_done_callback(finished(index))
        futures.append(future)
    results = [future.result(timeout=60) for future in futures]
    assert engine.batch_sizes == {3: 1}  # one static batch of all three
    # Each row's first piece came at the batch's first step, not with the answer at its end.
    first_step = [index for kind, index in events[: len(cases)]]
    assert sorted(first_step) == [0, 1, 2], events

    for index, (result, prompt, (model, max_tokens, _)) in enumerate(
        zip(results, prompts, cases, strict=True)
    ):
        adapter = adapter_folders.get(model)
        expected = alone(reference_model(tiny_base, adapter), prompt, max_tokens)
        assert result.token_ids == expected, model
        assert len(result.token_ids) == max_tokens
        assert result.finish_reason == "length"
        assert result.prompt_tokens == len(prompt)
        assert "".join(pieces[index]) == result.text
        assert len(pieces[index]) > 1  # streamed token by token, not told once at the end
        assert events.index(("text", index)) < events.index(("done", index))
        if adapter is not None:  # the row went through its own adapter, not the base
            assert alone(reference_model(tiny_base, None), prompt, max_tokens) != expected


@pytest.mark.parametrize(
    ("params", "field"),
    [(SamplingParams(temperature=0.7), "temperature"), (SamplingParams(seed=3), "seed")],
)
def test_sampling_is_refused(engine: PeftStaticEngine, params: SamplingParams, field: str) -> None:
    with pytest.raises(InputError, match="greedily") as refused:
        engine.submit([1, 2, 3], "customer-a", params)
    assert refused.value.field == field


def test_end_of_turn_ends_a_row_unless_it_is_ignored(
    tiny_base: Path, adapter_folders: dict[str, Path]
) -> None:
    config = PeftStaticConfig(tiny_base, adapter_folders, batch_window_s=0.5, device="cpu")
    engine = PeftStaticEngine(config)
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "Where is my order?"}])
        # Random tiny-llama never says its real end of turn; on this prompt the base says
        # "\n" again and again, so "\n" is made the end of turn, for generate and the rows.
        newline = alone(reference_model(tiny_base, None), prompt, 1)[0]
        engine.model.generation_config.eos_token_id = newline
        engine.eos = {newline}
        futures = [
            engine.submit(prompt, "base", SamplingParams(max_tokens=4, ignore_eos=ignore))
            for ignore in (True, False)
        ]
        ignored, honoured = (future.result(timeout=60) for future in futures)
    finally:
        engine.close()
    assert engine.batch_sizes == {2: 1}
    assert (ignored.token_ids, ignored.finish_reason) == ([newline] * 4, "length")
    assert (honoured.token_ids, honoured.finish_reason, honoured.text) == ([], "stop", "")
