"""Where a pipeline's training run reports: MLflow for its figures, S3 for its checkpoints.

``MlflowTrainingLog`` is the loop's ``TrainingHooks`` for one MLflow run. It speaks only
the ``Registry`` and ``Storage`` APIs; the loop itself never sees either.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_ops.registry import Registry
from lora_ops.storage import Storage
from lora_ops.training.loop import EvalMetrics, StepMetrics, TrainingHooks, TrainResult
from lora_ops.training.report import plot_loss_curve

log = logging.getLogger(__name__)

# A worker's progress bar is seen by no one: the run's log (Prefect UI, `pipeline run
# --remote`) gets about this many step lines per run instead.
STEP_LINES_PER_RUN = 20


@dataclass
class MlflowTrainingLog(TrainingHooks):
    """Logs each step to an MLflow run, copies each checkpoint to S3, and at the end logs
    the run's figures, loss curve and adapter.

    Attributes:
        registry: the MLflow run's registry.
        storage: where checkpoints are copied.
        run_id: the MLflow run being trained.
        checkpoints_uri: the s3:// prefix of this run's checkpoints (``step-<n>/`` under it).
        customer: whose adapter; names the loss-curve plot.
    """

    registry: Registry
    storage: Storage
    run_id: str
    checkpoints_uri: str
    customer: str

    def download_latest_checkpoint(self, local: Path) -> None:
        """Copy the newest checkpoint in S3, if any, to ``local/step-<n>/`` to resume from."""
        steps = sorted(
            {
                int(key.split("step-", 1)[1].split("/", 1)[0])
                for key in self.storage.list_keys(self.checkpoints_uri)
                if key.endswith("/MANIFEST.json") and "step-" in key
            }
        )
        if steps:
            self.storage.download_dir(
                f"{self.checkpoints_uri}step-{steps[-1]}/", local / f"step-{steps[-1]}"
            )
            log.info("resuming from checkpoint step %d in %s", steps[-1], self.checkpoints_uri)

    def on_step(self, metrics: StepMetrics) -> None:
        figures = {
            "train_loss": metrics.loss,
            "learning_rate": metrics.learning_rate,
            "grad_norm": metrics.grad_norm,
            "tokens_per_second": metrics.tokens_per_second,
        }
        self.registry.log_metrics(self.run_id, figures, step=metrics.step)
        every = max(1, metrics.total_steps // STEP_LINES_PER_RUN)
        if metrics.step % every == 0 or metrics.step == metrics.total_steps:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s",
                metrics.step,
                metrics.total_steps,
                metrics.loss,
                metrics.learning_rate,
                metrics.tokens_per_second,
            )

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        # Its own name: the pipeline's final "eval_loss" is the kept adapter's, at step 0.
        self.registry.log_metrics(self.run_id, {"val_loss": metrics.loss}, step=metrics.step)
        log.info(
            "step %d/%d  held-out loss %.4f  (best %.4f at step %d)",
            metrics.step,
            metrics.total_steps,
            metrics.loss,
            metrics.best_loss,
            metrics.best_step,
        )

    def on_checkpoint(self, folder: Path, step: int) -> None:
        self.storage.upload_dir(folder, f"{self.checkpoints_uri}step-{step}/", progress=False)

    def finish(self, result: TrainResult) -> None:
        """Log the finished run's figures, its loss curve (``plots/``) and its adapter."""
        self.registry.log_metrics(
            self.run_id,
            {
                "base_eval_loss": result.base_eval_loss,
                "train_eval_loss": result.eval_loss,
                "throughput_tokens_per_second": result.tokens_per_second,
                "peak_memory_bytes": float(result.peak_memory_bytes),
                "trainable_parameters": float(result.trainable_parameters),
                "resumed_from_step": float(result.resumed_from_step),
                # compute inside the run; the rest of the step's time is overhead
                "train_step_seconds": result.step_seconds,
                "train_eval_seconds": result.eval_seconds,
                **_selection_figures(result),
            },
        )
        # From MLflow, not result.train_losses: after a resume that holds only this
        # attempt's steps, the run's history holds every attempt's.
        history = self.registry.metric_history(self.run_id, "train_loss")
        with tempfile.TemporaryDirectory() as scratch:
            curve = plot_loss_curve(
                history,
                Path(scratch) / "loss_curve.png",
                base_eval_loss=result.base_eval_loss,
                eval_loss=result.eval_loss,
                title=f"{self.customer}: training loss",
            )
            self.registry.log_artifact(self.run_id, curve, "plots")
        self.registry.log_artifacts(self.run_id, result.adapter_dir, "adapter")


def _selection_figures(result: TrainResult) -> dict[str, float]:
    """Which evaluated step the adapter kept, and the last step's held-out loss beside it."""
    if result.best_step is None or result.last_eval_loss is None:
        return {}
    return {
        "best_val_step": float(result.best_step),
        "best_val_loss": result.eval_loss,
        "last_val_loss": result.last_eval_loss,
        "stopped_early": float(result.stopped_early),
    }
