"""Packing: rows of whole examples, attention kept inside each, the loss of the unpacked batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import base_models, data
from lora_ops.config import TrainConfig
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora
from lora_ops.training.batching import IGNORE_INDEX, collate, count_loss_tokens, summed_nll
from lora_ops.training.loop import (
    StepMetrics,
    TrainingHooks,
    TrainingJob,
    total_steps_for,
    train_adapter,
)
from lora_ops.training.packing import Pack, collate_rows, fill_ratio, pack_examples
from tests.architectures import build_base
from tests.helpers import randomize_adapter

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"
CPU = torch.device("cpu")
MAX_LEN = 512


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory):
    small = tmp_path_factory.mktemp("data") / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    return data.prepare_dataset(small, tiny_tokenizer, max_seq_len=256, eval_fraction=0.2)


@pytest.fixture
def adapted(tiny_model: PreTrainedModel) -> PreTrainedModel:
    """tiny-llama with a random (B != 0) adapter switched on, so it shapes the logits."""
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8))
    randomize_adapter(tiny_model, "default")
    return tiny_model


def members(pack: Pack) -> list[tuple[int, int]]:
    """(start, end) of each example in the pack's row."""
    bounds, start = [], 0
    for length in pack.lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


def test_every_example_lands_in_one_row_that_fits(dataset: data.PreparedDataset) -> None:
    examples = dataset.train
    packs = pack_examples(examples, MAX_LEN)
    assert all(len(p.input_ids) <= MAX_LEN for p in packs)
    assert sorted(n for p in packs for n in p.lengths) == sorted(len(e.input_ids) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    assert len(packs) <= -(-total // MAX_LEN) + 1  # within a row of the fewest possible
    assert fill_ratio(packs, MAX_LEN) == total / (len(packs) * MAX_LEN)
    assert pack_examples(examples, MAX_LEN) == packs  # no seed, no order: the same packs
    for pack in packs:
        for start, end in members(pack):
            assert pack.position_ids[start:end] == list(range(end - start))
            assert pack.labels[start] == IGNORE_INDEX  # never predicted from the example before
    assert count_loss_tokens(packs) == count_loss_tokens(examples)


def test_packed_loss_and_gradients_equal_the_unpacked_batch(
    adapted: PreTrainedModel, dataset: data.PreparedDataset
) -> None:
    examples = dataset.train[:12]
    packs = pack_examples(examples, MAX_LEN)
    assert len(packs) < len(examples)
    tokens = count_loss_tokens(examples)

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        adapted.zero_grad(set_to_none=True)
        with adapters_in_use(adapted, "default"):
            loss = summed_nll(adapted, batch) / tokens  # token-weighted mean
        loss.backward()
        grads = [p.grad.clone() for p in adapted.parameters() if p.requires_grad]
        return loss.detach(), grads

    unpacked_loss, unpacked_grads = loss_and_grads(collate(examples, 0, CPU))
    packed_loss, packed_grads = loss_and_grads(collate_rows(packs, 0, CPU))
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-5)
    for packed, unpacked in zip(packed_grads, unpacked_grads, strict=True):
        torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-4)


def assert_each_example_sees_only_itself(model: PreTrainedModel, packs: list[Pack]) -> None:
    batch = collate_rows(packs, 0, CPU)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        for row, pack in enumerate(packs):
            for start, end in members(pack):
                alone = model(input_ids=torch.tensor([pack.input_ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=1e-4)


def test_logits_inside_a_pack_equal_the_example_alone(
    adapted: PreTrainedModel, dataset: data.PreparedDataset
) -> None:
    packs = pack_examples(dataset.train[:10], MAX_LEN)
    assert max(len(p.lengths) for p in packs) >= 2
    with adapters_in_use(adapted, "default"):
        assert_each_example_sees_only_itself(adapted, packs)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "gemma2", "qwen3"])
def test_other_architectures_keep_attention_inside_each_example(
    model_type: str, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    # GPT-2's learned positions, GPT-NeoX's partial rotary, Gemma2's eager attention with
    # a sliding window: each reads the restarting position ids as boundaries.
    model = base_models.load_model(build_base(model_type, tmp_path / model_type), CPU)
    assert_each_example_sees_only_itself(model, pack_examples(dataset.train[:8], MAX_LEN))


def config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "lora": LoraSpec(r=4, alpha=8),
        "learning_rate": 1e-2,
        "max_seq_len": MAX_LEN,
        "seed": 3,
    }
    return TrainConfig(**{**settings, **overrides})  # type: ignore[arg-type]


class FirstStep(TrainingHooks):
    def __init__(self) -> None:
        self.metrics: list[StepMetrics] = []

    def on_step(self, metrics: StepMetrics) -> None:
        self.metrics.append(metrics)


def first_step(
    tiny_base: Path, dataset: data.PreparedDataset, out: Path, cfg: TrainConfig
) -> StepMetrics:
    model = base_models.load_model(tiny_base, CPU)
    seen = FirstStep()
    job = TrainingJob(
        model, dataset.train, dataset.eval, cfg, out, pad_id=0, progress=False, hooks=seen
    )
    train_adapter(job)
    assert len(seen.metrics) == 1
    return seen.metrics[0]


def test_a_packed_step_has_the_loss_and_gradient_of_an_unpacked_one(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    # One step over the whole split either way: every example in one batch, or every pack.
    # (Compared before the update: Adam's first step is about lr * sign(gradient), which
    # float noise can flip where a gradient is ~0.)
    n_packs = len(pack_examples(dataset.train, MAX_LEN))
    cfg = config(batch_size=len(dataset.train), max_steps=1)
    unpacked = first_step(tiny_base, dataset, tmp_path / "a", cfg)
    cfg = config(batch_size=n_packs, max_steps=1, packing=True)
    packed = first_step(tiny_base, dataset, tmp_path / "b", cfg)
    assert packed.tokens == unpacked.tokens
    assert packed.loss == pytest.approx(unpacked.loss, rel=1e-5)
    assert packed.grad_norm == pytest.approx(unpacked.grad_norm, rel=1e-4)


def test_packing_means_fewer_steps_and_auto_epochs_still_count_examples(
    dataset: data.PreparedDataset,
) -> None:
    n_examples, n_packs = len(dataset.train), len(pack_examples(dataset.train, MAX_LEN))
    cfg = config(batch_size=2, epochs="auto", packing=True)
    per_epoch = -(-n_packs // 2)
    assert total_steps_for(n_packs, cfg, n_examples) == per_epoch * cfg.epochs_for(n_examples)
