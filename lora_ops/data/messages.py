"""One chat message of a data file: its roles, its keys by role, and the form it is kept in.

System and user turns hold ``role`` and ``content``; an assistant turn may add
``tool_calls`` (its content then optional) and ``weight`` (0 or 1); a tool turn adds the
``tool_call_id`` of the call it answers. Checks return ``(field, reason)`` issues for
:mod:`lora_ops.data.examples` to place on a line.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired, TypedDict

from lora_ops.data.fields import Issue, json_type_name, shorten, text_problem
from lora_ops.data.tools import check_tool_calls

ROLES = ("system", "user", "assistant", "tool")

Role = Literal["system", "user", "assistant", "tool"]
_MESSAGE_KEYS: dict[str | None, tuple[str, ...]] = {
    "system": ("role", "content"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls", "weight"),
    "tool": ("role", "content", "tool_call_id"),
    None: ("role", "content", "tool_calls", "tool_call_id", "weight"),  # role not known
}
_MISPLACED = {
    "weight": "only assistant messages carry a weight",
    "tool_calls": "only assistant messages make tool calls",
    "tool_call_id": "only tool messages carry a tool_call_id",
}
LEGACY = {  # OpenAI's function calling before tools: refused, saying how to write it now
    "functions": "the legacy 'functions' is not supported; list each function in 'tools' as "
    '{"type": "function", "function": {...}}',
    "function_call": "the legacy 'function_call' is not supported; write the call in "
    "'tool_calls' and its function in the line's 'tools'",
    "function": "the legacy role 'function' is not supported; answer a call with role 'tool' "
    "and the call's 'tool_call_id'",
}


class Message(TypedDict):
    """One chat turn; a plain dict, so it goes to ``apply_chat_template`` unchanged.

    ``content`` is None only on an assistant turn that makes tool calls. The other keys are
    present only when they say something: ``tool_calls`` (OpenAI's shape, arguments as JSON
    text) on an assistant turn, ``tool_call_id`` on a tool turn, and ``weight`` only when it
    is 0 (1 is the default, so it is dropped).
    """

    role: Role
    content: str | None
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]
    weight: NotRequired[int]


def check_message(item: Any, where: str) -> tuple[str | None, list[Issue]]:
    """Check one message; return its role when the role is valid, and the issues."""
    if not isinstance(item, dict):
        return None, [(where, f"must be an object, got {json_type_name(item)}")]
    role = item.get("role") if item.get("role") in ROLES else None
    issues = [
        _message_key_issue(key, role, where) for key in item if key not in _MESSAGE_KEYS[role]
    ]
    if "role" not in item:
        issues.append((f"{where}.role", "missing key 'role'"))
    elif item["role"] == "function":
        issues.append((f"{where}.role", LEGACY["function"]))
    elif role is None:
        unknown = f"unknown role {shorten(repr(item['role']))}; use {', '.join(ROLES)}"
        issues.append((f"{where}.role", unknown))
    if problem := _content_problem(item, role):
        issues.append((f"{where}.content", problem))
    if role == "assistant":
        issues += _assistant_issues(item, where)
    if role == "tool" and "tool_call_id" not in item:
        issues.append((f"{where}.tool_call_id", "missing key 'tool_call_id'"))
    elif role == "tool" and (problem := text_problem(item["tool_call_id"])):
        issues.append((f"{where}.tool_call_id", problem))
    return role, issues


def _message_key_issue(key: str, role: str | None, where: str) -> Issue:
    field = f"{where}.{shorten(key)}"
    if key in LEGACY:
        return field, LEGACY[key]
    if key in _MISPLACED:
        return field, _MISPLACED[key]
    keys = ", ".join(repr(k) for k in _MESSAGE_KEYS[role])
    kind = f"a {role} message" if role else "a message"
    return field, f"unknown key {shorten(repr(key))}; {kind} holds {keys}"


def _content_problem(item: dict[str, Any], role: str | None) -> str | None:
    if role == "assistant" and "tool_calls" in item:  # content optional beside calls
        content = item.get("content")
        return None if content is None or content == "" else text_problem(content)
    if "content" not in item:
        return "missing key 'content'"
    if item["content"] is None and role == "assistant":
        return "must be a string, got null (null only beside tool_calls)"
    return text_problem(item["content"])


def _assistant_issues(item: dict[str, Any], where: str) -> list[Issue]:
    issues = (
        check_tool_calls(item["tool_calls"], f"{where}.tool_calls") if "tool_calls" in item else []
    )
    weight = item.get("weight", 1)
    if not (type(weight) is int and weight in (0, 1)):
        got = shorten(json.dumps(weight))
        issues.append((f"{where}.weight", f"must be 0 or 1, got {got}"))
    return issues


def normalized(item: dict[str, Any]) -> Message:
    """A checked message as kept: content None beside calls when empty, weight only if 0."""
    content = item.get("content")
    message = Message(role=item["role"], content=content if content != "" else None)
    if "tool_calls" in item:
        message["tool_calls"] = item["tool_calls"]
    if "tool_call_id" in item:
        message["tool_call_id"] = item["tool_call_id"]
    if item.get("weight", 1) == 0:
        message["weight"] = 0
    return message


def is_trained(message: Message) -> bool:
    """Whether loss is taken on ``message``: an assistant turn whose weight is not 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0
