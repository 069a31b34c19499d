"""One attempt at a pipeline training run, from files already downloaded: in the calling
process, or data-parallel in a ``torchrun`` group this module is also the entry of.

The pipeline's train step downloads the prepared set and the run's newest checkpoint once,
into a scratch folder, then trains from there. With ``LORA_OPS_TRAINING_PROCESSES`` above 1
it starts

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m lora_ops.training.attempt WORK/attempt.json

and waits. Every rank reads the same scratch folder; rank 0 alone reports to the MLflow run
(``MlflowTrainingLog``, rebuilt from the run id and the settings in its environment):
step metrics, checkpoints to S3, the finished adapter. It writes the ``TrainResult`` to
``WORK/result.json`` for the waiting process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.elastic.multiprocessing.errors import record

from lora_ops import base_models
from lora_ops.config import TrainConfig
from lora_ops.data import prepared
from lora_ops.errors import LoraOpsError
from lora_ops.registry import Registry
from lora_ops.settings import Settings, get_settings
from lora_ops.storage import Storage
from lora_ops.training import distributed
from lora_ops.training.group import end_with_the_waiter, run_group
from lora_ops.training.loop import TrainingHooks, TrainingJob, TrainResult, train_adapter
from lora_ops.training.memory import load_training_base
from lora_ops.training.run_log import MlflowTrainingLog

if TYPE_CHECKING:  # only for hints: datasets is imported where data is read
    from lora_ops.data.arrow_store import ArrowPrepared

log = logging.getLogger(__name__)

SPEC_FILE = "attempt.json"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Attempt:
    """What one attempt trains, and which MLflow run it reports to.

    Attributes:
        work: the scratch folder: ``dataset/`` (the prepared set), ``checkpoints/`` (the
            run's newest checkpoint, if any, and the new ones); ``adapter/`` is written.
        base: the base model's name.
        config: hyperparameters, LoRA targets named.
        key: the run's idempotency key; checkpoints of another key are refused.
        run_id: the MLflow run.
        checkpoints_uri: the s3:// prefix the run's checkpoints are copied to.
        customer: whose adapter.
        initial_adapter: a warm start's adapter folder, when there is no checkpoint.
    """

    work: Path
    base: str
    config: TrainConfig
    key: str
    run_id: str
    checkpoints_uri: str
    customer: str
    initial_adapter: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "work": str(self.work),
            "base": self.base,
            "config": self.config.model_dump(mode="json"),
            "key": self.key,
            "run_id": self.run_id,
            "checkpoints_uri": self.checkpoints_uri,
            "customer": self.customer,
            "initial_adapter": None if self.initial_adapter is None else str(self.initial_adapter),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        initial = data.get("initial_adapter")
        return cls(
            work=Path(data["work"]),
            base=str(data["base"]),
            config=TrainConfig.model_validate(data["config"]),
            key=str(data["key"]),
            run_id=str(data["run_id"]),
            checkpoints_uri=str(data["checkpoints_uri"]),
            customer=str(data["customer"]),
            initial_adapter=None if initial is None else Path(initial),
        )


def load_tokenized(folder: Path) -> ArrowPrepared | prepared.PreparedDataset:
    """A downloaded prepared set: the Arrow set, memory-mapped (its rows are read as training
    asks for them), or one stored before it in the JSONL format, which is read whole."""
    if (folder / prepared.MANIFEST_FILE).is_file():
        return prepared.load_prepared(folder)
    from lora_ops.data.arrow_store import load_arrow  # datasets: only where data is read

    return load_arrow(folder)


def training_log(attempt: Attempt, settings: Settings) -> MlflowTrainingLog:
    """The hooks that report ``attempt`` to its MLflow run and copy its checkpoints to S3."""
    return MlflowTrainingLog(
        Registry(settings.mlflow_tracking_uri),
        Storage.from_settings(settings),
        attempt.run_id,
        attempt.checkpoints_uri,
        attempt.customer,
    )


def train_attempt(attempt: Attempt, hooks: TrainingHooks, progress: bool) -> TrainResult:
    """Train from the scratch folder, resuming from its newest checkpoint; under torchrun
    this rank's part of it, on this rank's device."""
    work = attempt.work
    examples = load_tokenized(work / "dataset")
    tokenizer = base_models.load_tokenizer(attempt.base)
    model = load_training_base(attempt.base, attempt.config, distributed.local_device())
    job = TrainingJob(
        model=model,
        train_examples=examples.train,
        eval_examples=examples.eval,
        config=attempt.config,
        out_dir=work / "adapter",
        pad_id=int(tokenizer.pad_token_id),
        base_model_name=attempt.base,
        checkpoint_dir=work / "checkpoints",
        resume=True,
        run_key=attempt.key,
        hooks=hooks,
        progress=progress,
        initial_adapter=attempt.initial_adapter,
    )
    return train_adapter(job)


def train_in_group(attempt: Attempt, processes: int, settings: Settings) -> int:
    """Train ``attempt`` data-parallel in ``processes`` ranks; returns the step count.

    Rank 0 logs to the MLflow run and uploads checkpoints and the adapter itself, so when
    this returns the run holds everything an in-process attempt leaves in it.

    Raises:
        TrainingGroupFailed: a rank failed (the message names the exit code and holds the
            group's last lines); the checkpoints copied so far stay for a resume.
    """
    spec = attempt.work / SPEC_FILE
    spec.write_text(json.dumps(attempt.to_json()))
    run_group(processes, __name__, [str(spec)], env=_servers_env(settings))
    result = attempt.work / RESULT_FILE
    if not result.is_file():
        raise LoraOpsError(f"the training processes exited without writing {result}")
    steps = int(json.loads(result.read_text())["steps"])
    log.info("the %d training processes finished after step %d", processes, steps)
    return steps


def _servers_env(settings: Settings) -> dict[str, str]:
    """The variables that point a rank's settings at the servers ``settings`` name, which
    need not be the ones this process's environment names."""
    return {
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "LORA_OPS_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.aws_region,
        "LORA_OPS_BUCKET": settings.bucket,
    }


@record  # torchrun's failure summary then holds the rank's error, not only its exit code
def main(spec: Path) -> None:
    """One rank of ``train_in_group``'s group."""
    attempt = Attempt.from_json(json.loads(spec.read_text()))
    with distributed.process_group():
        # The other ranks get no hooks at all: not even an MLflow client.
        run_log = training_log(attempt, get_settings()) if distributed.is_main() else None
        # No bar: its redraws would reach the run's log as lines; rank 0 logs step lines.
        result = train_attempt(attempt, run_log or TrainingHooks(), progress=False)
    if run_log is not None:
        run_log.finish(result)
        (attempt.work / RESULT_FILE).write_text(json.dumps(result.to_json()))


def _log_like_a_rank() -> None:
    """Rank 0 logs what an in-process attempt logs; the others only their errors, which the
    waiting process shows when the group fails."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for chatty in ("httpx", "httpcore", "urllib3", "botocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if distributed.launched_rank() > 0:
        logging.getLogger().setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.simplefilter("ignore")


if __name__ == "__main__":
    _log_like_a_rank()
    end_with_the_waiter()
    main(Path(sys.argv[1]))
