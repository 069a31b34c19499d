"""Settings read from the environment (``LORA_OPS_*``); nothing here comes from code."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lora-ops"


class Settings(BaseSettings):
    """Where lora-ops keeps its local files and which services it talks to."""

    model_config = SettingsConfigDict(env_prefix="LORA_OPS_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Materialised base models live under <cache_dir>/models/<name>.",
    )


def get_settings() -> Settings:
    """Read the settings afresh, so a changed environment (tests, CLI flags) is seen."""
    return Settings()
