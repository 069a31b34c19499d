"""The training loop on tiny-llama: schedule, determinism, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from lora_ops import base_models, data
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec
from lora_ops.training import checkpoints
from lora_ops.training.loop import (
    StepMetrics,
    TrainingHooks,
    TrainingJob,
    learning_rate_at,
    micro_batches,
    total_steps_for,
    train_adapter,
)

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory):
    small = tmp_path_factory.mktemp("data") / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    return data.prepare_dataset(small, tiny_tokenizer, max_seq_len=256, eval_fraction=0.2)


def config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "lora": LoraSpec(r=4, alpha=8, dropout=0.1),
        "learning_rate": 5e-3,
        "max_steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "seed": 7,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


class Crash(Exception):
    pass


class Recorder(TrainingHooks):
    """Keeps what a run reported; raises at ``crash_at_step`` as a crash would."""

    def __init__(self, crash_at_step: int | None = None) -> None:
        self.steps: list[StepMetrics] = []
        self.checkpoints: list[tuple[Path, int]] = []
        self.crash_at_step = crash_at_step

    def on_step(self, metrics: StepMetrics) -> None:
        if metrics.step == self.crash_at_step:
            raise Crash
        self.steps.append(metrics)

    def on_checkpoint(self, folder: Path, step: int) -> None:
        self.checkpoints.append((folder, step))


def run(
    tiny_base: Path, dataset: data.PreparedDataset, out: Path, cfg: TrainConfig, **kwargs: object
):
    model = base_models.load_model(tiny_base, "cpu")
    job = TrainingJob(
        model, dataset.train, dataset.eval, cfg, out, pad_id=0, progress=False, **kwargs
    )  # type: ignore[arg-type]
    return train_adapter(job)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    cfg = config(learning_rate=1e-3, warmup_ratio=0.2)
    rates = [learning_rate_at(step, 10, cfg) for step in range(10)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))
    # step 9 is 7/8 of the way through the 8 decay steps
    assert rates[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_each_epoch_visits_every_example_once_in_a_seeded_order() -> None:
    cfg = config(batch_size=3, grad_accum=1, seed=1)
    batches = micro_batches(10, cfg, start_step=0)
    epoch0 = [next(batches) for _ in range(4)]
    epoch1 = [next(batches) for _ in range(4)]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert sorted(i for b in epoch1 for i in b) == list(range(10))
    assert epoch0 != epoch1
    resumed = micro_batches(10, cfg, start_step=4)
    assert [next(resumed) for _ in range(4)] == epoch1
    assert total_steps_for(10, config(batch_size=3, grad_accum=2, epochs=3, max_steps=None)) == 6


def test_training_lowers_loss_and_reports_each_step(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    seen = Recorder()
    result = run(tiny_base, dataset, tmp_path, config(max_steps=12, learning_rate=2e-2), hooks=seen)
    assert [m.step for m in seen.steps] == list(range(1, 13))
    assert all(m.tokens_per_second > 0 and m.grad_norm > 0 for m in seen.steps)
    assert result.eval_loss < result.base_eval_loss
    assert sum(result.train_losses[-3:]) < sum(result.train_losses[:3])
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(result.eval_loss)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # the compute inside the run, which bench/pipeline.py sets against its wall time
    assert summary["step_seconds"] == result.step_seconds > 0
    assert summary["eval_seconds"] == result.eval_seconds > 0


def test_same_seed_gives_the_same_losses(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    first = run(tiny_base, dataset, tmp_path / "a", config())
    second = run(tiny_base, dataset, tmp_path / "b", config())
    other = run(tiny_base, dataset, tmp_path / "c", config(seed=8))
    assert first.train_losses == second.train_losses
    assert first.train_losses != other.train_losses


def test_resume_after_a_crash_ends_with_the_same_adapter(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    cfg = config(checkpoint_every=2)
    whole = run(tiny_base, dataset, tmp_path / "whole", cfg)
    cut = Recorder(crash_at_step=5)
    with pytest.raises(Crash):
        run(tiny_base, dataset, tmp_path / "cut", cfg, hooks=cut)
    saved = checkpoints.complete_checkpoints(tmp_path / "cut" / "checkpoints")
    assert [p.name for p in saved] == ["step-2", "step-4"]
    assert cut.checkpoints == [(saved[0], 2), (saved[1], 4)]  # each told to the hooks
    resumed = run(tiny_base, dataset, tmp_path / "cut", cfg, resume=True)
    assert resumed.resumed_from_step == 4
    assert resumed.train_losses == pytest.approx(whole.train_losses[4:], abs=1e-6)
    expected = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=1e-6, rtol=1e-5)


def test_checkpoint_from_another_config_is_refused(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    run(tiny_base, dataset, tmp_path, config(checkpoint_every=2))
    with pytest.raises(InputError, match="another config"):
        run(
            tiny_base,
            dataset,
            tmp_path,
            config(checkpoint_every=2, learning_rate=1e-3),
            resume=True,
        )


def test_empty_splits_are_refused(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    model = base_models.load_model(tiny_base, "cpu")
    with pytest.raises(InputError, match="no evaluation examples"):
        train_adapter(
            TrainingJob(model, dataset.train, [], config(), tmp_path, pad_id=0, progress=False)
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_runs_under_bf16_autocast(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    model = base_models.load_model(tiny_base, "cuda")
    job = TrainingJob(
        model, dataset.train, dataset.eval, config(max_steps=3), tmp_path, pad_id=0, progress=False
    )
    result = train_adapter(job)
    assert all(math.isfinite(loss) for loss in result.train_losses)
    assert result.peak_memory_bytes > 0
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in lora_params)
