"""Errors lora-ops reports to its users, each saying what is wrong and where."""

from __future__ import annotations

from pathlib import Path


class LoraOpsError(Exception):
    """Base class for every error lora-ops raises on purpose."""


class InputError(LoraOpsError, ValueError):
    """A user's input was refused: carries the file, line and field it was found at.

    Rendered as ``FILE:LINE: field: reason`` (parts that are unknown are left out), the
    shape compilers use, so editors and people can jump straight to the problem.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [p for p in (where, self.field) if p]
        return ": ".join([*parts, self.reason])


class AdapterMismatchError(InputError):
    """An adapter does not fit the model it is being loaded into."""
