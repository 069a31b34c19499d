"""The per-customer flow: prep -> train -> evaluate -> register (-> deploy)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows import tasks
from flows.deploy import deploy_adapter
from lora_ops import names, pipeline
from lora_ops.config import TrainConfig


@flow(name="retrain", log_prints=False)
def retrain(
    customer: str,
    data_uri: str,
    base: str = "smollm2-135m-instruct",
    config: TrainConfig = Field(default_factory=TrainConfig),  # noqa: B008 - Prefect form
    min_improvement: float = Field(0.05, ge=0, lt=1),
    production_tolerance: float = Field(0.02, ge=0, lt=1),
    auto_deploy: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and register one customer's LoRA adapter."""
    logger = get_run_logger()
    names.check_customer(customer)
    dataset = tasks.prep(customer, data_uri, base, config.max_seq_len, config.eval_fraction)
    key, _ = pipeline.run_key(dataset, config)
    existing = tasks.find_registered_version(customer, key)
    if existing is not None:
        logger.info("version %s already holds this base, data and config: nothing new", existing)
        return {
            "customer": customer,
            "version": existing,
            "new_version": False,
            "dataset_sha256": dataset.sha256,
        }
    trained = tasks.train(dataset, config)
    outcome = tasks.evaluate(dataset, trained, min_improvement, production_tolerance)
    version = tasks.register(dataset, trained, outcome, config)
    deployed = None
    if auto_deploy:
        deployed = deploy_adapter(customer=customer, version=version, triggered_by="retrain")
    return {
        "customer": customer,
        "version": version,
        "new_version": True,
        "run_id": trained.run_id,
        "dataset_sha256": dataset.sha256,
        "gate": outcome.figures(),
        "deployed": deployed,
    }
