"""The training flow: the GPU part of the pipeline, run in-process or on its own work pool."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from flows import tasks
from lora_ops import pipeline
from lora_ops.config import TrainConfig
from lora_ops.errors import LoraOpsError
from lora_ops.settings import get_settings

TRAIN_FLOW = "train-adapter"


class TrainingRunFailed(LoraOpsError):
    """The train-adapter run on the training work pool did not complete."""


@flow(name=TRAIN_FLOW)
def train_adapter(dataset: pipeline.DatasetRef, config: TrainConfig) -> pipeline.TrainedRef:
    """Train one customer's LoRA adapter, logging to MLflow and checkpointing to S3."""
    return tasks.train(dataset, config)


def train_where_configured(
    dataset: pipeline.DatasetRef, config: TrainConfig
) -> pipeline.TrainedRef:
    """Run ``train-adapter`` here, or on the training work pool when one is configured.

    With ``LORA_OPS_TRAINING_WORK_POOL`` set, training is submitted to the deployment
    ``train-adapter/<pool>`` (made by ``lora-ops schedule sync``) and this flow waits for
    it, so only GPU workers train while prep, evaluation and registration stay here. The
    finished run is then read back from MLflow by its idempotency key, so no result has to
    travel between the two workers.
    """
    pool = get_settings().training_work_pool
    if not pool:
        return train_adapter(dataset, config)
    logger = get_run_logger()
    name = f"{TRAIN_FLOW}/{pool}"
    logger.info("submitting training of %s to work pool %s (%s)", dataset.customer, pool, name)
    # Called from sync code, run_deployment returns the FlowRun, not a coroutine.
    run: FlowRun = run_deployment(  # type: ignore[assignment]
        name,
        parameters={"dataset": asdict(dataset), "config": config.model_dump(mode="json")},
        timeout=None,  # training takes as long as it takes; the run's own state says how it ended
        poll_interval=5,
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = run.state.message if run.state else ""
        raise TrainingRunFailed(f"training run {run.id} on pool {pool} ended {state}: {message}")
    return pipeline.finished_training(dataset, config)
