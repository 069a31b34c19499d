"""The pipeline's training hooks, against stand-ins that record the Registry and Storage calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_ops.training.loop import EvalMetrics, StepMetrics, TrainResult
from lora_ops.training.run_log import MlflowTrainingLog

PREFIX = "s3://bucket/checkpoints/acme/run-1/"


class Recording:
    """Records every method call made on it, as (name, args, kwargs)."""

    def __init__(self, **answers: Any) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.answers = answers

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return self.answers.get(name)

        return record

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def training_log(registry: Recording, storage: Recording) -> MlflowTrainingLog:
    return MlflowTrainingLog(registry, storage, "run-1", PREFIX, "acme")  # type: ignore[arg-type]


def step(n: int, total: int = 40) -> StepMetrics:
    return StepMetrics(n, total, 2.0, 1e-3, 0.5, 100, 900.0, 1.0)


def test_each_step_is_logged_at_its_step_and_each_checkpoint_copied(tmp_path: Path) -> None:
    registry, storage = Recording(), Recording()
    hooks = training_log(registry, storage)
    hooks.on_step(step(3))
    hooks.on_checkpoint(tmp_path / "step-4", 4)
    assert registry.calls == [
        (
            "log_metrics",
            (
                "run-1",
                {
                    "train_loss": 2.0,
                    "learning_rate": 1e-3,
                    "grad_norm": 0.5,
                    "tokens_per_second": 900.0,
                },
            ),
            {"step": 3},
        )
    ]
    assert storage.calls == [
        ("upload_dir", (tmp_path / "step-4", PREFIX + "step-4/"), {"progress": False})
    ]


def test_the_run_log_gets_about_twenty_step_lines(caplog: pytest.LogCaptureFixture) -> None:
    hooks = training_log(Recording(), Recording())
    with caplog.at_level("INFO", logger="lora_ops.training.run_log"):
        for n in range(1, 41):
            hooks.on_step(step(n))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20
    assert lines[-1].startswith("step 40/40  loss 2.0000")


def test_resume_downloads_the_newest_whole_checkpoint(tmp_path: Path) -> None:
    keys = [
        "checkpoints/acme/run-1/step-9/MANIFEST.json",
        "checkpoints/acme/run-1/step-10/MANIFEST.json",  # newer than 9, though it sorts first
        "checkpoints/acme/run-1/step-12/adapter_model.safetensors",  # upload cut off
    ]
    storage = Recording(list_keys=sorted(keys))
    training_log(Recording(), storage).download_latest_checkpoint(tmp_path)
    assert storage.calls[1:] == [("download_dir", (PREFIX + "step-10/", tmp_path / "step-10"), {})]


def test_no_checkpoint_in_storage_means_a_fresh_start(tmp_path: Path) -> None:
    storage = Recording(list_keys=[])
    training_log(Recording(), storage).download_latest_checkpoint(tmp_path)
    assert storage.names() == ["list_keys"]


def test_finish_logs_the_figures_the_curve_and_the_adapter(tmp_path: Path) -> None:
    registry = Recording(metric_history=[3.0, 2.0, 1.5])
    result = TrainResult(
        adapter_dir=tmp_path / "adapter",
        steps=3,
        train_losses=[1.5],  # a resumed attempt: only its own steps
        base_eval_loss=3.1,
        eval_loss=1.4,
        trainable_parameters=1000,
        total_parameters=100_000,
        tokens_per_second=800.0,
        peak_memory_bytes=2**20,
        resumed_from_step=2,
        step_seconds=1.5,
        eval_seconds=0.5,
    )
    curves: list[bytes] = []

    def keep_curve(run_id: str, path: Path, artifact_path: str) -> None:
        curves.append(path.read_bytes())  # the scratch file is gone once finish returns
        registry.calls.append(("log_artifact", (run_id, path.name, artifact_path), {}))

    registry.log_artifact = keep_curve  # type: ignore[method-assign]
    training_log(registry, Recording()).finish(result)
    assert registry.names() == ["log_metrics", "metric_history", "log_artifact", "log_artifacts"]
    figures = registry.calls[0][1][1]
    assert figures == {
        "base_eval_loss": 3.1,
        "train_eval_loss": 1.4,
        "throughput_tokens_per_second": 800.0,
        "peak_memory_bytes": float(2**20),
        "trainable_parameters": 1000.0,
        "resumed_from_step": 2.0,
        "train_step_seconds": 1.5,
        "train_eval_seconds": 0.5,
    }
    assert registry.calls[1][1] == ("run-1", "train_loss")
    assert registry.calls[2][1] == ("run-1", "loss_curve.png", "plots")
    assert curves[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert registry.calls[3][1] == ("run-1", tmp_path / "adapter", "adapter")


def test_each_evaluation_is_logged_at_its_step_and_the_kept_step_at_the_end(
    tmp_path: Path,
) -> None:
    registry = Recording(metric_history=[3.0, 2.0])
    hooks = training_log(registry, Recording())
    hooks.on_evaluation(EvalMetrics(4, 8, 2.5, 4, 2.5, True))
    assert registry.calls == [("log_metrics", ("run-1", {"val_loss": 2.5}), {"step": 4})]
    registry.calls.clear()
    result = TrainResult(
        adapter_dir=tmp_path,
        steps=8,
        train_losses=[3.0, 2.0],
        base_eval_loss=3.1,
        eval_loss=2.5,
        trainable_parameters=1,
        total_parameters=2,
        tokens_per_second=1.0,
        peak_memory_bytes=1,
        best_step=4,
        last_eval_loss=2.7,
        evaluations=[(4, 2.5), (8, 2.7)],
    )
    hooks.finish(result)
    figures = registry.calls[0][1][1]
    assert figures["train_eval_loss"] == figures["best_val_loss"] == 2.5
    assert (figures["best_val_step"], figures["last_val_loss"]) == (4.0, 2.7)
    assert figures["stopped_early"] == 0.0
