"""The per-customer flow: check, prep, train, evaluate, register (, review, deploy)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Completed
from pydantic import Field

from flows import tasks
from flows.deploy import deploy_adapter
from flows.review import await_review
from flows.training import train_where_configured
from lora_ops import names
from lora_ops.config import TrainConfig
from lora_ops.defaults import DEFAULT_BASE, DEFAULT_GATE

RETRAIN_FLOW = "retrain"
# Frozen, so one shared default is safe; a default_factory would leave a Python caller with
# PydanticUndefined and make `config` required in the deployment's parameter schema.
DEFAULT_CONFIG = TrainConfig()


@flow(name=RETRAIN_FLOW, log_prints=False)
def retrain(  # noqa: PLR0913 - a flow's parameters are its deployments' API
    customer: str,
    data_uri: str,
    base: str = DEFAULT_BASE,
    config: TrainConfig = DEFAULT_CONFIG,
    min_improvement: float = Field(DEFAULT_GATE.min_improvement, ge=0, lt=1),
    production_tolerance: float = Field(DEFAULT_GATE.production_tolerance, ge=0, lt=1),
    auto_deploy: bool = False,
    require_review: bool = False,
    review_timeout_hours: float = Field(72.0, gt=0, le=24 * 30),
    validation_data_uri: str | None = None,
) -> State[dict[str, Any]]:
    """Train, evaluate and register one customer's LoRA adapter; deploy it when asked."""
    logger = get_run_logger()
    names.check_customer(customer)
    dataset_sha256, key = tasks.check_data(customer, data_uri, base, config, validation_data_uri)
    existing = tasks.find_registered_version(customer, key)
    if existing is not None:
        message = (
            f"no new data: version {existing} of adapter-{customer} already holds this data "
            f"({dataset_sha256[:12]}), base and config"
        )
        logger.info(message)
        result = {
            "customer": customer,
            "status": "no new data",
            "version": existing,
            "new_version": False,
            "dataset_sha256": dataset_sha256,
        }
        return Completed(message=message, data=result, name="No new data")
    limits = (config.max_seq_len, config.eval_fraction)
    dataset = tasks.prep(customer, data_uri, base, *limits, validation_data_uri)
    trained = train_where_configured(dataset, config)
    outcome = tasks.evaluate(dataset, trained, min_improvement, production_tolerance)
    version = tasks.register(dataset, trained, outcome, config)
    result = {
        "customer": customer,
        "status": "registered",
        "version": version,
        "new_version": True,
        "run_id": trained.run_id,
        "dataset_sha256": dataset.sha256,
        "gate": outcome.figures(),
        "deployed": None,
    }
    message = f"registered adapter-{customer} version {version} ({outcome.gate.reason})"
    if not auto_deploy:
        if require_review:  # `lora-ops deploy` refuses it until a reviewer approves
            tasks.mark_for_review(customer, version)
        return Completed(message=message, data=result)
    if require_review and not await_review(customer, version, review_timeout_hours * 3600):
        result["status"] = "rejected"
        message = f"adapter-{customer} version {version} was rejected in review: not deployed"
        logger.info(message)
        return Completed(message=message, data=result, name="Rejected")
    result["deployed"] = deploy_adapter(customer=customer, version=version, triggered_by="retrain")
    result["status"] = "deployed"
    message = f"adapter-{customer} version {version} registered and deployed to the fleet"
    return Completed(message=message, data=result, name="Deployed")
