"""Request bodies of the fine-tuning API, OpenAI's fields, each checked or refused by name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_ops.errors import InputError

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedMethod(_Strict):
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(_Strict):
    """``POST /v1/fine_tuning/jobs``."""

    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    hyperparameters: dict[str, Any] | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, pairs: dict[str, str] | None) -> dict[str, str] | None:
        if pairs is None:
            return None
        if len(pairs) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, value in pairs.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"keys are at most {MAX_METADATA_KEY} characters and values at most "
                    f"{MAX_METADATA_VALUE}; {key[:70]!r} is not"
                )
        return pairs

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, integrations: list[Any] | None) -> list[Any] | None:
        if integrations:
            raise ValueError(
                "integrations are not offered here: every job is tracked in MLflow already"
            )
        return integrations

    def hyperparameters_given(self) -> tuple[dict[str, Any], str]:
        """The hyperparameters and the field they came in, from the method or the old field.

        Raises:
            InputError: a method other than supervised, or hyperparameters in both places.
        """
        if self.method is None:
            return dict(self.hyperparameters or {}), "hyperparameters"
        if self.method.type != "supervised":
            raise InputError(
                f"method {self.method.type!r} is not offered here; use 'supervised'",
                field="method.type",
            )
        if self.hyperparameters is not None:
            raise InputError(
                "give hyperparameters in method.supervised.hyperparameters only",
                field="hyperparameters",
            )
        supervised = self.method.supervised or SupervisedMethod()
        return dict(supervised.hyperparameters), "method.supervised.hyperparameters"
