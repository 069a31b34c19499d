"""The training loop on tiny-llama: schedule, determinism, checkpoints and exact resume,
held-out evaluations, best-checkpoint selection, early stopping and warm start."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from lora_ops import base_models, data
from lora_ops.config import TrainConfig, auto_epochs
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, adapters_in_use, load_adapter
from lora_ops.training import checkpoints
from lora_ops.training.evaluate import eval_loss
from lora_ops.training.loop import (
    EvalMetrics,
    StepMetrics,
    TrainingHooks,
    TrainingJob,
    TrainResult,
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


@pytest.fixture(scope="module")
def tiny_dataset(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> data.PreparedDataset:
    """12 training and 4 held-out examples: few enough for tiny-llama to overfit them."""
    small = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:16]))
    return data.prepare_dataset(small, tiny_tokenizer, max_seq_len=256, eval_fraction=0.3)


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


class EvalRecorder(Recorder):
    def __init__(self, crash_at_step: int | None = None) -> None:
        super().__init__(crash_at_step)
        self.evaluations: list[EvalMetrics] = []

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        self.evaluations.append(metrics)


# Far too long for 12 examples at a high learning rate: the held-out loss bottoms out and
# climbs again while the training loss keeps falling.
OVERLONG = {
    "lora": LoraSpec(r=8, alpha=32, target_modules=("all-linear",)),
    "learning_rate": 3e-2,
    "max_steps": 24,
    "batch_size": 4,
    "grad_accum": 1,
    "warmup_ratio": 0.0,
    "seed": 0,
    "eval_every": 2,
}


def adapter_loss(tiny_base: Path, folder: Path, dataset: data.PreparedDataset) -> float:
    model = base_models.load_model(tiny_base, "cpu")
    load_adapter(model, folder)
    with adapters_in_use(model, "default"):
        return eval_loss(model, dataset.eval, pad_id=0, batch_size=4)


@pytest.fixture(scope="module")
def overlong(
    tiny_base: Path, tiny_dataset: data.PreparedDataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, EvalRecorder, Path]:
    """One over-long run, shared: its result, what its hooks heard, its adapter folder."""
    seen, out = EvalRecorder(), tmp_path_factory.mktemp("overlong")
    return run(tiny_base, tiny_dataset, out, config(**OVERLONG), hooks=seen), seen, out


def test_the_best_evaluated_weights_become_the_adapter_not_the_last(
    tiny_base: Path,
    tiny_dataset: data.PreparedDataset,
    overlong: tuple[TrainResult, EvalRecorder, Path],
) -> None:
    result, seen, out = overlong
    assert [m.step for m in seen.evaluations] == list(range(2, 25, 2))
    assert result.evaluations == [(m.step, m.loss) for m in seen.evaluations]
    best_step, best_loss = min(result.evaluations, key=lambda pair: pair[1])
    assert (result.best_step, result.eval_loss) == (best_step, best_loss)
    assert result.last_eval_loss == seen.evaluations[-1].loss
    assert best_step < 24
    assert result.eval_loss < result.last_eval_loss
    assert adapter_loss(tiny_base, out, tiny_dataset) == pytest.approx(best_loss, rel=1e-6)
    assert seen.evaluations[-1].best_step == best_step
    assert seen.evaluations[0].improved is True
    assert result.steps == 24
    assert not result.stopped_early


def test_evaluating_leaves_the_training_steps_as_they_were(
    tiny_base: Path, tiny_dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    plain = run(tiny_base, tiny_dataset, tmp_path / "a", config())
    evaluated = run(tiny_base, tiny_dataset, tmp_path / "b", config(eval_every=2))
    assert evaluated.train_losses == plain.train_losses
    assert [step for step, _ in evaluated.evaluations] == [2, 4, 6]


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement(
    tiny_base: Path,
    tiny_dataset: data.PreparedDataset,
    tmp_path: Path,
    overlong: tuple[TrainResult, EvalRecorder, Path],
) -> None:
    full = overlong[0]
    stopped = run(
        tiny_base, tiny_dataset, tmp_path / "stop", config(**OVERLONG, early_stopping_patience=2)
    )
    # The same run up to the second evaluation in a row that beats no earlier one.
    best, stale, stop_at = math.inf, 0, None
    for step, loss in full.evaluations:
        best, stale = (loss, 0) if loss < best else (best, stale + 1)
        if stale == 2:
            stop_at = step
            break
    assert stop_at is not None
    assert stop_at < 24
    assert stopped.stopped_early
    assert stopped.steps == stop_at == len(stopped.train_losses)
    assert stopped.evaluations == full.evaluations[: len(stopped.evaluations)]
    assert stopped.eval_loss == min(loss for _, loss in stopped.evaluations)
    assert stopped.eval_loss < stopped.evaluations[-1][1]


def test_a_resumed_run_keeps_the_best_weights_of_the_whole_run(
    tiny_base: Path, tiny_dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    cfg = config(eval_every=1, checkpoint_every=2, learning_rate=3e-2)
    whole = run(tiny_base, tiny_dataset, tmp_path / "whole", cfg)
    with pytest.raises(Crash):
        run(tiny_base, tiny_dataset, tmp_path / "cut", cfg, hooks=Recorder(crash_at_step=5))
    resumed = run(tiny_base, tiny_dataset, tmp_path / "cut", cfg, resume=True)
    assert resumed.resumed_from_step == 4  # evaluations 1-4 come from the checkpoint
    assert [step for step, _ in resumed.evaluations] == [1, 2, 3, 4, 5, 6]
    for (_, loss), (_, expected) in zip(resumed.evaluations, whole.evaluations, strict=True):
        assert loss == pytest.approx(expected, abs=1e-6)
    assert resumed.best_step == whole.best_step
    expected_weights = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for key, tensor in expected_weights.items():
        torch.testing.assert_close(actual[key], tensor, atol=1e-6, rtol=1e-5)


def test_a_warm_start_begins_from_the_given_adapter(
    tiny_base: Path, dataset: data.PreparedDataset, tmp_path: Path
) -> None:
    first = run(tiny_base, dataset, tmp_path / "first", config())
    # One step at a negligible learning rate: what comes out is what went in.
    again = run(
        tiny_base,
        dataset,
        tmp_path / "again",
        config(max_steps=1, learning_rate=1e-12),
        initial_adapter=tmp_path / "first",
    )
    assert again.eval_loss == pytest.approx(first.eval_loss, rel=1e-5)
    expected = load_file(tmp_path / "first" / "adapter_model.safetensors")
    actual = load_file(tmp_path / "again" / "adapter_model.safetensors")
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("examples", "epochs"),
    [(1, 25), (10, 10), (33, 3), (34, 3), (400, 3), (8333, 3), (8334, 2), (30_000, 1)],
)
def test_auto_epochs_follow_openais_rule(examples: int, epochs: int) -> None:
    assert auto_epochs(examples) == epochs
    cfg = config(epochs="auto", max_steps=None, batch_size=1, grad_accum=1)
    assert total_steps_for(examples, cfg) == examples * epochs
