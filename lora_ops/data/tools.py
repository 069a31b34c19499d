"""Tools and tool calls in OpenAI's fine-tuning shape, checked before anything is trained.

A line's ``tools`` lists function definitions (``{"type": "function", "function": {"name",
"description"?, "parameters"?, "strict"?}}``); an assistant turn's ``tool_calls`` lists calls
(``{"id", "type": "function", "function": {"name", "arguments"}}``, the arguments JSON text of
an object); a ``tool`` turn answers one call by its ``tool_call_id``. Each check returns
``(field, reason)`` issues for :mod:`lora_ops.data.examples` to place on a line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lora_ops.data.fields import Issue, json_type_name, required_text, shorten, unknown_keys

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_TOOL_KEYS = ("type", "function")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_CALL_KEYS = ("id", "type", "function")
_CALL_FUNCTION_KEYS = ("name", "arguments")


def check_tools(raw: Any) -> tuple[tuple[dict[str, Any], ...], list[Issue]]:
    """A line's ``tools``: function definitions with well-formed, unique names.

    Returns:
        The tools as given (empty when there are issues), and the issues.
    """
    if not isinstance(raw, list):
        return (), [("tools", f"must be a list, got {json_type_name(raw)}")]
    issues: list[Issue] = []
    first: dict[str, int] = {}
    for i, tool in enumerate(raw):
        name, tool_issues = _check_tool(tool, f"tools[{i}]")
        issues += tool_issues
        if name is not None and name in first:
            reason = f"function {name!r} is already defined by tools[{first[name]}]"
            issues.append((f"tools[{i}].function.name", reason))
        elif name is not None:
            first[name] = i
    return (() if issues else tuple(raw)), issues


def _check_tool(tool: Any, where: str) -> tuple[str | None, list[Issue]]:
    """Check one definition; return its name when the name is valid, and the issues."""
    if not isinstance(tool, dict):
        return None, [(where, f"must be an object, got {json_type_name(tool)}")]
    issues = unknown_keys(tool, where, _TOOL_KEYS) + _type_issues(tool, where)
    function = tool.get("function")
    if not isinstance(function, dict):
        got = "missing key 'function'" if "function" not in tool else None
        reason = got or f"must be an object, got {json_type_name(function)}"
        return None, [*issues, (f"{where}.function", reason)]
    where = f"{where}.function"
    issues += unknown_keys(function, where, _FUNCTION_KEYS)
    name = function.get("name")
    name_reason = _name_problem(name) if "name" in function else "missing key 'name'"
    if name_reason:
        issues.append((f"{where}.name", name_reason))
    if "description" in function and not isinstance(function["description"], str):
        got = json_type_name(function["description"])
        issues.append((f"{where}.description", f"must be a string, got {got}"))
    if "parameters" in function and (problem := _parameters_problem(function["parameters"])):
        issues.append((f"{where}.parameters", problem))
    if "strict" in function and not isinstance(function["strict"], bool):
        got = json_type_name(function["strict"])
        issues.append((f"{where}.strict", f"must be true or false, got {got}"))
    return (None if name_reason else name), issues


def _type_issues(obj: Mapping[str, Any], where: str) -> list[Issue]:
    if "type" not in obj:
        return [(f"{where}.type", "missing key 'type'")]
    if obj["type"] != "function":
        return [(f"{where}.type", f"must be 'function', got {shorten(json.dumps(obj['type']))}")]
    return []


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str):
        return f"must be a string, got {json_type_name(name)}"
    if not TOOL_NAME.fullmatch(name):
        return f"{shorten(repr(name))} is not 1-64 letters, digits, '_' or '-'"
    return None


def _parameters_problem(parameters: Any) -> str | None:
    if not isinstance(parameters, dict):
        return f"must be a JSON schema object, got {json_type_name(parameters)}"
    if parameters.get("type", "object") != "object":  # arguments are named: an object
        return f"the schema's type must be 'object', got {shorten(json.dumps(parameters['type']))}"
    return None


# ---------------------------------------------------------------------------- calls


def check_tool_calls(raw: Any, where: str) -> list[Issue]:
    """An assistant turn's ``tool_calls``: a non-empty list of well-formed calls."""
    if not isinstance(raw, list):
        return [(where, f"must be a list, got {json_type_name(raw)}")]
    if not raw:
        return [(where, "holds no calls; leave 'tool_calls' out of a turn that makes none")]
    issues: list[Issue] = []
    for j, call in enumerate(raw):
        issues += _call_issues(call, f"{where}[{j}]")
    return issues


def _call_issues(call: Any, where: str) -> list[Issue]:
    if not isinstance(call, dict):
        return [(where, f"must be an object, got {json_type_name(call)}")]
    issues = unknown_keys(call, where, _CALL_KEYS) + required_text(call, "id", where)
    issues += _type_issues(call, where)
    function = call.get("function")
    if not isinstance(function, dict):
        reason = "missing key 'function'" if "function" not in call else None
        return [*issues, (f"{where}.function", reason or "must be an object")]
    where = f"{where}.function"
    issues += unknown_keys(function, where, _CALL_FUNCTION_KEYS)
    if "name" not in function:
        issues.append((f"{where}.name", "missing key 'name'"))
    elif not isinstance(function["name"], str):
        got = json_type_name(function["name"])
        issues.append((f"{where}.name", f"must be a string, got {got}"))
    if "arguments" not in function:
        issues.append((f"{where}.arguments", "missing key 'arguments'"))
    elif reason := arguments_problem(function["arguments"]):
        issues.append((f"{where}.arguments", reason))
    return issues


def arguments_problem(arguments: Any) -> str | None:
    """Why ``arguments`` is not JSON text of an object (OpenAI's form), or None."""
    if not isinstance(arguments, str):
        got = json_type_name(arguments)
        return f"must be JSON text of an object (a string), got {got}"
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        return f"not valid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return "not valid JSON: nested too deeply"
    if not isinstance(value, dict):
        return f"must be JSON text of an object, got {json_type_name(value)}"
    return None


def call_issues(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    parallel_tool_calls: bool = True,
) -> list[Issue]:
    """Calls and answers across a conversation whose messages are each well formed.

    Every call names a function in ``tools`` and has an id no other call has; a ``tool``
    message comes right after an assistant turn with calls (or after another tool message)
    and answers, once, a call made earlier in the conversation. With
    ``parallel_tool_calls`` false, a turn makes one call at most.
    """
    names = {tool["function"]["name"] for tool in tools}
    made: dict[str, int] = {}  # call id -> index of the message that made it
    answered: dict[str, int] = {}
    issues: list[Issue] = []
    after_calls = False
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            issues += _made_issues(message.get("tool_calls") or [], i, names, made)
            if len(message.get("tool_calls") or []) > 1 and not parallel_tool_calls:
                reason = "makes several calls, but the line sets parallel_tool_calls to false"
                issues.append((f"messages[{i}].tool_calls", reason))
        elif message["role"] == "tool":
            if not after_calls:
                reason = "a tool message must follow an assistant turn with tool_calls"
                issues.append((f"messages[{i}].role", reason + " (or another tool message)"))
            issues += _answer_issues(message["tool_call_id"], i, made, answered)
        after_calls = bool(message.get("tool_calls")) or (message["role"] == "tool" and after_calls)
    return issues


def _made_issues(
    calls: Sequence[Mapping[str, Any]], index: int, names: set[str], made: dict[str, int]
) -> list[Issue]:
    issues: list[Issue] = []
    for j, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{j}]"
        name = call["function"]["name"]
        if name not in names:
            defined = (
                "which is not in the line's 'tools'" if names else "but the line has no 'tools'"
            )
            issues.append((f"{where}.function.name", f"calls {shorten(repr(name))}, {defined}"))
        if call["id"] in made:
            used = f"messages[{made[call['id']]}]"
            reason = f"call id {shorten(repr(call['id']))} is already used in {used}"
            issues.append((f"{where}.id", reason))
        else:
            made[call["id"]] = index
    return issues


def _answer_issues(
    call_id: str, index: int, made: dict[str, int], answered: dict[str, int]
) -> list[Issue]:
    where = f"messages[{index}].tool_call_id"
    if call_id not in made:
        return [(where, f"{shorten(repr(call_id))} answers no earlier call of the conversation")]
    if call_id in answered:
        earlier = f"messages[{answered[call_id]}]"
        return [(where, f"call {shorten(repr(call_id))} is already answered by {earlier}")]
    answered[call_id] = index
    return []
