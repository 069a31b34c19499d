"""Settings read from the environment only; defaults point at the embedded local stack.

``LORA_OPS_*`` variables, plus the standard names the MLflow, boto3 and Prefect clients
read themselves (``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``PREFECT_API_URL``), so one shell environment drives lora-ops,
the MLflow and Prefect CLIs and their UIs alike. Secrets are ``SecretStr``: they print as
``**********`` and never reach logs, MLflow params or Prefect parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lora_ops.defaults import DEFAULT_BASE

# Development keys of the embedded S3 server (it listens on 127.0.0.1 only). Any real
# deployment sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
# Client variables that could point lora-ops (or boto3, MLflow, Prefect) at some other
# server, or sign with other keys: what a throwaway stack must clear from its environment.
OUTSIDE_VARIABLES = (
    "LORA_OPS_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
)
EMBEDDED_ACCESS_KEY = "lora-ops-dev"
EMBEDDED_SECRET_KEY = "lora-ops-dev-secret"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lora-ops"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Endpoints, credentials and local folders of one lora-ops installation."""

    model_config = SettingsConfigDict(env_prefix="LORA_OPS_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Materialised base models live under <cache_dir>/models/<name>.",
    )
    state_dir: Path = Field(
        Path(".lora-ops"),
        description="The embedded stack's ports, pids, logs and data.",
    )
    bucket: str = Field("lora-ops", description="The one S3 bucket lora-ops writes to.")
    s3_port: int = Field(9000, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    worker_port: int = Field(
        4210, ge=1, le=65535, description="Health endpoint of the stack's Prefect worker."
    )
    replica_port: int = Field(8000, ge=1, le=65535, description="The stack's serving replica.")
    replica_base: str = Field(
        DEFAULT_BASE, description="Base model of the stack's serving replica."
    )
    s3_endpoint_url: str = Field(
        "",
        validation_alias=_env(
            "LORA_OPS_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"
        ),
    )
    aws_access_key_id: SecretStr = Field(
        SecretStr(EMBEDDED_ACCESS_KEY), validation_alias=_env("AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: SecretStr = Field(
        SecretStr(EMBEDDED_SECRET_KEY), validation_alias=_env("AWS_SECRET_ACCESS_KEY")
    )
    aws_region: str = Field("us-east-1", validation_alias=_env("AWS_DEFAULT_REGION", "AWS_REGION"))
    mlflow_tracking_uri: str = Field("", validation_alias=_env("MLFLOW_TRACKING_URI"))
    database_url: str = Field(
        "", description="SQLAlchemy URL of the service database (default: SQLite in state_dir)."
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="The whsec_ secret `lora-ops api --webhook-url` signs job events with.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for a replica's adapter load/unload endpoints."
    )
    adapter_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders a replica may load local adapters from, separated like PATH; "
        "empty: only s3:// (in the bucket) and models:/ adapters.",
    )
    fleet_copies: int = Field(
        2,
        ge=1,
        le=64,
        description="Replicas each customer's production adapter is placed on (k): deploys, "
        "the gateway's fleet controller and `fleet remove` all place by it.",
    )
    work_pool: str = Field(
        "lora-ops", description="Prefect work pool the retrain/<customer> deployments run on."
    )
    training_work_pool: str = Field(
        "",
        description="Work pool of the train-adapter deployment (GPU workers); empty: train "
        "inside the retrain flow run.",
    )
    training_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes the pipeline's training step runs in, data-parallel under "
        "torchrun (one GPU each; gloo on CPUs); 1: in the calling process.",
    )
    review_sweep_seconds: int = Field(
        60, ge=5, le=86400, description="How often review-sweep resumes reviewed runs."
    )
    review_poll_seconds: int = Field(
        10, ge=1, le=3600, description="How often a run paused for review checks for its resume."
    )
    prefect_api_url: str | None = Field(
        None,
        validation_alias=_env("PREFECT_API_URL"),
        description="Unset: flows run in Prefect's ephemeral mode.",
    )

    @field_validator("adapter_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: PATH-style, like PYTHONPATH
            return [Path(part) for part in value.split(os.pathsep) if part.strip()]
        return value

    @model_validator(mode="after")
    def _point_at_embedded_stack(self) -> Settings:
        # Unset endpoints mean the embedded stack, on whatever ports it was given.
        if not self.s3_endpoint_url:
            self.s3_endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        if not self.database_url:
            self.database_url = f"sqlite:///{self.state_dir.expanduser().resolve()}/lora-ops.db"
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        return self


def get_settings() -> Settings:
    """Read the settings afresh, so a changed environment (tests, CLI flags) is seen."""
    return Settings()
