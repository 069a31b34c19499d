"""The steps of one customer's retrain: prepare the data, train, evaluate and register a candidate.

Each step is a plain function over S3 (``storage``) and MLflow (``registry``) that the
Prefect tasks in ``flows/`` wrap with their retry policies, so the logic is testable and
usable without Prefect. Steps hand each other small references (URIs, run ids), never
local paths, so each can run on another worker.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_ops import base_models, data, names, warm_start
from lora_ops.config import LoraSpec, TrainConfig
from lora_ops.data.examples import paired_sha256
from lora_ops.defaults import DEFAULT_GATE
from lora_ops.errors import LoraOpsError
from lora_ops.files import sha256_file
from lora_ops.fleet import smoke
from lora_ops.lora import load_adapter
from lora_ops.prep import DatasetRef, fetch_data, fetch_validation, prepare_data
from lora_ops.registry import Registry, adapter_tags, idempotency_key
from lora_ops.registry.tags import (
    ADAPTER_SHA256_TAG,
    GATE_FAILED,
    GATE_PASSED,
    GATE_REASON_TAG,
    GATE_TAG,
    IDEMPOTENCY_KEY_TAG,
    SMOKE_OUTPUT_TAG,
    TRAINING_DONE,
    TRAINING_DONE_TAG,
    TRAINING_STEPS_TAG,
    WARM_START_TAG,
    WARM_START_VERSION_RUN_TAG,
    WARM_START_VERSION_TAG,
)
from lora_ops.settings import Settings, get_settings
from lora_ops.storage import Storage
from lora_ops.training.attempt import Attempt, load_tokenized, train_attempt, train_in_group
from lora_ops.training.evaluate import evaluate_adapters, perplexity
from lora_ops.training.gate import GateDecision, decide_gate
from lora_ops.training.report import gate_markdown
from lora_ops.training.run_log import MlflowTrainingLog

log = logging.getLogger(__name__)

__all__ = [
    "DatasetRef",
    "EvalOutcome",
    "GateFailed",
    "TrainedRef",
    "data_fingerprint",
    "evaluate_candidate",
    "existing_version",
    "fetch_data",
    "finished_training",
    "prepare_data",
    "register_candidate",
    "run_key",
    "train_candidate",
]


class GateFailed(LoraOpsError):
    """The candidate did not pass the evaluation gate; nothing was registered."""


@dataclass(frozen=True)
class TrainedRef:
    """A finished training run in MLflow; its adapter is the run artifact ``adapter/``."""

    run_id: str
    key: str
    base_sha256: str
    steps: int
    reused: bool
    warm_start_version: str | None = None  # the production version training began from


def _services(settings: Settings | None) -> tuple[Settings, Storage, Registry]:
    settings = settings or get_settings()
    return settings, Storage.from_settings(settings), Registry(settings.mlflow_tracking_uri)


def data_fingerprint(
    customer: str,
    data_uri: str,
    base: str,
    config: TrainConfig,
    settings: Settings | None = None,
    validation_data_uri: str | None = None,
) -> tuple[str, str]:
    """(dataset sha256, idempotency key) of the customer's data as it is now.

    Reads and checks the data but does not tokenize or upload it, so a scheduled run can
    find out quickly whether anything changed since the last registered version.
    """
    names.check_customer(customer)
    _, storage, _ = _services(settings)
    folder = base_models.resolve_base(base)
    # Checked before anything is prepared or trained; the key names the modules trained.
    config = _with_lora(config, base_models.check_lora_fits(folder, config.lora))
    base_sha = base_models.base_sha256(folder)
    with tempfile.TemporaryDirectory() as work:
        sha256 = data.dataset_sha256(fetch_data(data_uri, Path(work), storage))
        validation = fetch_validation(validation_data_uri, Path(work), storage)
        if validation is not None:
            sha256 = paired_sha256(sha256, data.dataset_sha256(validation))
    return sha256, idempotency_key(base_sha, sha256, config)


def run_key(dataset: DatasetRef, config: TrainConfig) -> tuple[str, str]:
    """(idempotency key, base sha256) of training ``dataset`` with ``config``."""
    folder = base_models.resolve_base(dataset.base)
    base_sha = base_models.base_sha256(folder)
    config = _with_lora(config, base_models.named_lora_targets(folder, config.lora))
    return idempotency_key(base_sha, dataset.sha256, config), base_sha


def _with_lora(config: TrainConfig, lora: LoraSpec) -> TrainConfig:
    return config if lora == config.lora else config.model_copy(update={"lora": lora})


def existing_version(customer: str, key: str, settings: Settings | None = None) -> str | None:
    """The version number already registered for this key, if any."""
    _, _, registry = _services(settings)
    version = registry.find_version(customer, key)
    return None if version is None else str(version.version)


def train_candidate(
    dataset: DatasetRef,
    config: TrainConfig,
    settings: Settings | None = None,
    progress: bool = True,
) -> TrainedRef:
    """Train (or resume, or reuse) the candidate adapter for ``dataset`` as an MLflow run.

    A run with the same key whose training finished is reused as is; one that was cut off
    resumes from its newest checkpoint in ``checkpoints/<customer>/<run>/``. With
    ``config.warm_start`` training begins from the production adapter, checked to fit
    before any run is started. With ``training_processes`` above 1 (the setting
    ``LORA_OPS_TRAINING_PROCESSES``) it trains data-parallel in that many processes.

    Raises:
        InputError: a warm start without a production version, or from one that does not fit.
    """
    settings, storage, registry = _services(settings)
    # The run's parameters name the modules trained, not "the base's defaults".
    config = _with_lora(config, base_models.named_lora_targets(dataset.base, config.lora))
    key, base_sha = run_key(dataset, config)
    run = registry.find_run(dataset.customer, key)
    if run is not None and run.tags.get(TRAINING_DONE_TAG) == TRAINING_DONE:
        log.info("training run %s for this data and config is finished: reusing it", run.run_id)
        warm_from = run.tags.get(WARM_START_VERSION_RUN_TAG)
        return TrainedRef(run.run_id, key, base_sha, 0, reused=True, warm_start_version=warm_from)
    with tempfile.TemporaryDirectory() as scratch:
        warm = None
        if config.warm_start is not None:
            warm = warm_start.fetch_production(
                registry, dataset.customer, base_sha, config.lora, Path(scratch)
            )
        if run is None:
            run_id = registry.start_run(dataset.customer, tags={IDEMPOTENCY_KEY_TAG: key})
            registry.log_params(run_id, _run_params(dataset, config, base_sha, warm))
            if warm is not None:
                registry.set_tag(run_id, WARM_START_VERSION_RUN_TAG, warm.version)
        else:
            run_id = run.run_id
            log.info("resuming training run %s", run_id)
        uri = names.s3_uri(settings.bucket, names.checkpoint_prefix(dataset.customer, run_id))
        training_log = MlflowTrainingLog(registry, storage, run_id, uri, dataset.customer)
        initial = warm.adapter_dir if warm is not None else None
        steps = _train_logged(dataset, config, key, settings, training_log, progress, initial)
    registry.set_tag(run_id, TRAINING_STEPS_TAG, str(steps))
    registry.set_tag(run_id, TRAINING_DONE_TAG, TRAINING_DONE)
    registry.end_run(run_id, "FINISHED")
    warm_from = warm.version if warm is not None else None
    return TrainedRef(run_id, key, base_sha, steps, reused=False, warm_start_version=warm_from)


def _train_logged(
    dataset: DatasetRef,
    config: TrainConfig,
    key: str,
    settings: Settings,
    training_log: MlflowTrainingLog,
    progress: bool,
    initial_adapter: Path | None = None,
) -> int:
    """Train in a scratch folder from the run's newest checkpoint (or ``initial_adapter``'s
    weights, when there is none); returns the step count.

    With ``training_processes`` above 1 the ranks of a torchrun group train from the files
    downloaded here, and rank 0 reports to the run (``training.attempt``).
    """
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        training_log.storage.download_dir(dataset.uri, work / "dataset")
        training_log.download_latest_checkpoint(work / "checkpoints")
        attempt = Attempt(
            work=work,
            base=dataset.base,
            config=config,
            key=key,
            run_id=training_log.run_id,
            checkpoints_uri=training_log.checkpoints_uri,
            customer=dataset.customer,
            initial_adapter=initial_adapter,
        )
        if settings.training_processes > 1:
            return train_in_group(attempt, settings.training_processes, settings)
        result = train_attempt(attempt, training_log, progress)
        training_log.finish(result)
        return result.steps


def finished_training(
    dataset: DatasetRef, config: TrainConfig, settings: Settings | None = None
) -> TrainedRef:
    """The finished training run for ``dataset`` and ``config``, as another worker left it.

    Raises:
        LoraOpsError: no run with this key finished training.
    """
    _, _, registry = _services(settings)
    key, base_sha = run_key(dataset, config)
    run = registry.find_run(dataset.customer, key)
    if run is None or run.tags.get(TRAINING_DONE_TAG) != TRAINING_DONE:
        raise LoraOpsError(
            f"no finished training run of {dataset.customer} for dataset {dataset.sha256[:12]} "
            f"and this config (idempotency key {key[:12]})"
        )
    steps = int(run.tags.get(TRAINING_STEPS_TAG, "0"))
    warm_from = run.tags.get(WARM_START_VERSION_RUN_TAG)
    return TrainedRef(run.run_id, key, base_sha, steps, reused=False, warm_start_version=warm_from)


def _run_params(
    dataset: DatasetRef, config: TrainConfig, base_sha: str, warm: warm_start.WarmStart | None
) -> dict[str, Any]:
    # What "auto" and the validation file became, beside what was asked for.
    resolved: dict[str, Any] = {"epochs_resolved": config.epochs_for(dataset.train_size)}
    if dataset.validation_data_uri is not None:
        resolved["validation_data_uri"] = dataset.validation_data_uri
    if warm is not None:
        resolved["warm_start_version"] = warm.version
    return resolved | {
        **config.model_dump(mode="json"),
        "customer": dataset.customer,
        "base_model": dataset.base,
        "base_model_sha256": base_sha,
        "dataset_sha256": dataset.sha256,
        "train_examples": dataset.train_size,
        "eval_examples": dataset.eval_size,
    }


@dataclass(frozen=True)
class EvalOutcome:
    """The evaluation figures, the gate's decision and the Markdown report."""

    gate: GateDecision
    generations: list[dict[str, str]]
    markdown: str

    def figures(self) -> dict[str, Any]:
        return asdict(self.gate) | {"improvement": self.gate.improvement}


def evaluate_candidate(
    dataset: DatasetRef,
    trained: TrainedRef,
    min_improvement: float = DEFAULT_GATE.min_improvement,
    production_tolerance: float = DEFAULT_GATE.production_tolerance,
    settings: Settings | None = None,
) -> EvalOutcome:
    """Held-out loss of base, candidate and production; sample replies; the gate."""
    settings, storage, registry = _services(settings)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        storage.download_dir(dataset.uri, work / "dataset")
        examples = load_tokenized(work / "dataset")
        prompts = storage.read_json(dataset.prompts_uri)
        tokenizer = base_models.load_tokenizer(dataset.base)
        model = base_models.load_model(dataset.base)
        load_adapter(
            model, registry.download_run_artifacts(trained.run_id, "adapter", work), "candidate"
        )
        production = registry.get_version_by_alias(dataset.customer, names.PRODUCTION)
        if production is not None:
            prod_dir = registry.download_adapter(
                f"models:/{names.registered_model_name(dataset.customer)}@production",
                work / "production",
            )
            load_adapter(model, prod_dir, "production")
        started = time.perf_counter()
        evaluation = evaluate_adapters(
            model,
            tokenizer,
            examples.eval,
            [p["messages"] for p in prompts],
            has_production=production is not None,
            tools=[p.get("tools", []) for p in prompts],
        )
        evaluate_seconds = time.perf_counter() - started
    gate = decide_gate(
        evaluation.base_loss,
        evaluation.candidate_loss,
        evaluation.production_loss,
        min_improvement,
        production_tolerance,
    )
    _log_evaluation(registry, trained.run_id, gate, evaluation.generations, evaluate_seconds)
    markdown = gate_markdown(
        dataset.customer, gate, evaluation.generations, run_url=registry.run_url(trained.run_id)
    )
    return EvalOutcome(gate=gate, generations=evaluation.generations, markdown=markdown)


def _log_evaluation(
    registry: Registry,
    run_id: str,
    gate: GateDecision,
    generations: list[dict[str, str]],
    evaluate_seconds: float,
) -> None:
    metrics = {
        "base_eval_loss": gate.base_loss,
        "eval_loss": gate.candidate_loss,
        "eval_perplexity": perplexity(gate.candidate_loss),
        "improvement_over_base": gate.improvement,
        "evaluate_seconds": evaluate_seconds,  # the loss passes and generations, no loading
    }
    if gate.production_loss is not None:
        metrics["production_eval_loss"] = gate.production_loss
    registry.log_metrics(run_id, metrics)
    columns = {name: [row[name] for row in generations] for name in ("prompt", "base", "candidate")}
    registry.log_table(run_id, columns, "eval/generations.json")
    registry.set_tag(run_id, GATE_TAG, GATE_PASSED if gate.passed else GATE_FAILED)
    registry.set_tag(run_id, GATE_REASON_TAG, gate.reason)


def register_candidate(
    dataset: DatasetRef,
    trained: TrainedRef,
    outcome: EvalOutcome,
    config: TrainConfig,
    settings: Settings | None = None,
) -> str:
    """Register the candidate as a version with alias ``candidate``; returns its number.

    A failed gate registers nothing and raises GateFailed with the figures. A version for
    the same base, data and config is returned as is, never registered twice.
    """
    if not outcome.gate.passed:
        raise GateFailed(f"gate failed for {dataset.customer}: {outcome.gate.reason}")
    settings, _, registry = _services(settings)
    found = registry.find_version(dataset.customer, trained.key)
    if found is not None:
        log.info("version %s already holds this base, data and config", found.version)
        return str(found.version)
    tags = adapter_tags(
        base_model=dataset.base,
        base_model_sha256=trained.base_sha256,
        dataset_sha256=dataset.sha256,
        lora=base_models.named_lora_targets(dataset.base, config.lora),
        eval_loss=outcome.gate.candidate_loss,
        base_eval_loss=outcome.gate.base_loss,
        gate_passed=True,
    )
    if trained.warm_start_version is not None:
        tags[WARM_START_TAG] = names.PRODUCTION
        tags[WARM_START_VERSION_TAG] = trained.warm_start_version
    with tempfile.TemporaryDirectory() as work:
        adapter_dir = registry.download_run_artifacts(trained.run_id, "adapter", Path(work))
        # What deploys check: the weights' checksum, and the answer to the smoke prompt.
        tags[ADAPTER_SHA256_TAG] = sha256_file(adapter_dir / "adapter_model.safetensors")
        tags[SMOKE_OUTPUT_TAG] = smoke.smoke_reply(dataset.base, adapter_dir)
        version = registry.register_adapter(
            dataset.customer, trained.run_id, adapter_dir, tags, outcome.markdown, trained.key
        )
    log.info(
        "registered %s version %s", names.registered_model_name(dataset.customer), version.version
    )
    return str(version.version)
