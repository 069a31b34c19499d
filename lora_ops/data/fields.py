"""Field checks the data readers share: the issue pair, JSON type names, text and key rules.

A check returns ``(field, reason)`` issues rather than raising, so a reader can collect every
problem of a line and attach the file and line once (:class:`~lora_ops.errors.InputError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Issue = tuple[str | None, str]  # (field, reason) before a file and line are attached


def json_type_name(value: Any) -> str:
    """How a JSON value's type reads in an error message ("an object", "null", ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def text_problem(value: Any) -> str | None:
    """Why ``value`` is not usable text (a non-blank, valid Unicode string), or None."""
    if not isinstance(value, str):
        return f"must be a string, got {json_type_name(value)}"
    if not value.strip():
        return "empty or whitespace-only"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates
        return "holds an unpaired surrogate escape such as \\ud800, which is not valid Unicode"
    return None


def unknown_keys(obj: Mapping[str, Any], where: str, allowed: Iterable[str]) -> list[Issue]:
    """One issue per key of ``obj`` outside ``allowed``, naming the keys that are."""
    allowed = tuple(allowed)
    listing = ", ".join(repr(key) for key in allowed)
    return [
        (f"{where}.{shorten(key)}", f"unknown key {shorten(repr(key))}; expected {listing}")
        for key in obj
        if key not in allowed
    ]


def required_text(obj: Mapping[str, Any], key: str, where: str) -> list[Issue]:
    """An issue when ``obj[key]`` is missing or not usable text."""
    if key not in obj:
        return [(f"{where}.{key}", f"missing key {key!r}")]
    reason = text_problem(obj[key])
    return [(f"{where}.{key}", reason)] if reason else []
