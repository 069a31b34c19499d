"""One Prefect task per pipeline step: the library call plus its retry policy."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State, TaskRun

from lora_ops import pipeline
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError
from lora_ops.registry import review


def retry_unless_bad_input(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry storage and registry hiccups; bad input or a failed gate fail the same way again."""
    try:
        state.result()
    except (InputError, pipeline.GateFailed):
        return False
    except Exception:
        return True
    return False


@task(
    name="prep", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_bad_input
)
def prep(
    customer: str,
    data_uri: str,
    base: str,
    max_seq_len: int,
    eval_fraction: float,
    validation_data_uri: str | None = None,
) -> pipeline.DatasetRef:
    """Check and tokenize the customer's data; store it in S3 by content hash."""
    return pipeline.prepare_data(
        customer,
        data_uri,
        base,
        max_seq_len,
        eval_fraction,
        validation_data_uri=validation_data_uri,
    )


@task(
    name="check-data",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def check_data(
    customer: str,
    data_uri: str,
    base: str,
    config: TrainConfig,
    validation_data_uri: str | None = None,
) -> tuple[str, str]:
    """Read and check the data; its sha256 and the run's idempotency key (no tokenizing)."""
    return pipeline.data_fingerprint(
        customer, data_uri, base, config, validation_data_uri=validation_data_uri
    )


@task(name="find-registered-version", retries=2, retry_delay_seconds=[2, 10])
def find_registered_version(customer: str, key: str) -> str | None:
    """The version already registered for this base, data and config, if any."""
    return pipeline.existing_version(customer, key)


# A retried train task resumes from the newest checkpoint in S3, not from step zero.
@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def train(dataset: pipeline.DatasetRef, config: TrainConfig) -> pipeline.TrainedRef:
    """Train the LoRA adapter, logging to MLflow and checkpointing to S3."""
    return pipeline.train_candidate(dataset, config)


@task(
    name="evaluate",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def evaluate(
    dataset: pipeline.DatasetRef,
    trained: pipeline.TrainedRef,
    min_improvement: float,
    production_tolerance: float,
) -> pipeline.EvalOutcome:
    """Compare base, candidate and production on held-out data; decide the gate."""
    outcome = pipeline.evaluate_candidate(dataset, trained, min_improvement, production_tolerance)
    create_markdown_artifact(
        markdown=outcome.markdown,
        key=f"eval-{dataset.customer}",
        description=f"Evaluation of {dataset.customer}'s candidate adapter",
    )
    return outcome


@task(
    name="register",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def register(
    dataset: pipeline.DatasetRef,
    trained: pipeline.TrainedRef,
    outcome: pipeline.EvalOutcome,
    config: TrainConfig,
) -> str:
    """Register the adapter as a new MLflow model version with alias 'candidate'."""
    return pipeline.register_candidate(dataset, trained, outcome, config)


@task(name="mark-for-review", retries=2, retry_delay_seconds=[2, 10])
def mark_for_review(customer: str, version: str) -> None:
    """Tag the version as waiting for a reviewer's decision."""
    review.request_review(customer, version)
