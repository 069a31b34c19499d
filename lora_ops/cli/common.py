"""What every lora-ops command shares: consoles, --base and --customer, error conversion.

The training options are declared in ``options``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from lora_ops.errors import InputError

out = Console(soft_wrap=True)  # long lines stay whole: people copy them, scripts grep them
err = Console(stderr=True)
T = TypeVar("T")

BaseOption = Annotated[
    str, typer.Option("--base", help="Catalogue name (see `base list`) or a transformers folder.")
]
CustomerOption = Annotated[str, typer.Option("--customer", help="Customer id, e.g. acme.")]


def checked(build: Callable[[], T]) -> T:
    """Run a pydantic constructor; its first complaint becomes an InputError with the field."""
    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        cause = first.get("ctx", {}).get("error")
        # A validator's own message, without pydantic's "Value error, " in front of it.
        reason = str(cause) if isinstance(cause, Exception) else first["msg"]
        raise InputError(reason, field=field) from None


def point_at_local_stack() -> None:
    """Use the embedded stack's servers when it is up and nothing else is configured."""
    from lora_ops import stack

    for name, value in stack.service_env_if_up().items():
        os.environ.setdefault(name, value)


def secret_value(value: Any) -> str | None:
    return None if value is None else str(value.get_secret_value())
