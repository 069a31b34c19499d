"""Tests for tool use and weight in data files: every check with its line and field, identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_ops import data
from lora_ops.data import Message
from lora_ops.data.examples import canonical_json
from tests.unit.data.samples import WEATHER, as_line, call, tool_chat, write_lines

USER = {"role": "user", "content": "Weather in Paris?"}
CALLS = {"role": "assistant", "content": None, "tool_calls": [call()]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}
ANSWER = {"role": "assistant", "content": "It is 18 degrees."}


def line(*messages: dict[str, Any], tools: Any = (WEATHER,), **extra: Any) -> bytes:
    """A line of these messages offering ``tools`` (None: no 'tools' key)."""
    obj: dict[str, Any] = {"messages": list(messages), **extra}
    if tools is not None:
        obj["tools"] = list(tools) if isinstance(tools, tuple) else tools
    return as_line(obj)


def edit(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**message, **changes}


def weather(**function: Any) -> dict[str, Any]:
    """The weather tool with its function's keys changed."""
    return {"type": "function", "function": {**WEATHER["function"], **function}}


def call_with(**function: Any) -> dict[str, Any]:
    """A call to get_weather with its function's keys changed."""
    return {**call(), "function": {**call()["function"], **function}}


def without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


# (bad line, field, key phrase of the reason); written as line 3 of a good file of tool lines.
BAD_TOOL_LINES = [
    # calls
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[call(name="get_time")]), RESULT, ANSWER),
        "messages[1].tool_calls[0].function.name",
        "calls 'get_time', which is not in the line's 'tools'",
        id="call-unknown-function",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=None),
        "messages[1].tool_calls[0].function.name",
        "but the line has no 'tools'",
        id="call-without-tools",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[call_with(arguments="{city")]), RESULT, ANSWER),
        "messages[1].tool_calls[0].function.arguments",
        "not valid JSON",
        id="arguments-not-json",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[call_with(arguments="[1, 2]")]), RESULT, ANSWER),
        "messages[1].tool_calls[0].function.arguments",
        "must be JSON text of an object, got an array",
        id="arguments-array",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[call_with(arguments={"city": "P"})]), RESULT, ANSWER),
        "messages[1].tool_calls[0].function.arguments",
        "(a string), got an object",
        id="arguments-object-not-text",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[call(), call(city="Rome")]), RESULT, ANSWER),
        "messages[1].tool_calls[1].id",
        "call id 'call_1' is already used in messages[1]",
        id="duplicate-call-id",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, CALLS, ANSWER),
        "messages[3].tool_calls[0].id",
        "call id 'call_1' is already used in messages[1]",
        id="duplicate-call-id-across-turns",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls={"id": "call_1"}), RESULT, ANSWER),
        "messages[1].tool_calls",
        "must be a list, got an object",
        id="tool-calls-not-list",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[]), RESULT, ANSWER),
        "messages[1].tool_calls",
        "holds no calls",
        id="tool-calls-empty",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[edit(call(), type="fn")]), RESULT, ANSWER),
        "messages[1].tool_calls[0].type",
        "must be 'function'",
        id="call-type",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[without(call(), "id")]), RESULT, ANSWER),
        "messages[1].tool_calls[0].id",
        "missing key 'id'",
        id="call-without-id",
    ),
    pytest.param(
        line(USER, edit(CALLS, tool_calls=[edit(call(), index=0)]), RESULT, ANSWER),
        "messages[1].tool_calls[0].index",
        "unknown key 'index'",
        id="call-unknown-key",
    ),
    pytest.param(
        line(USER, edit(CALLS, content=" "), RESULT, ANSWER),
        "messages[1].content",
        "empty or whitespace-only",
        id="blank-content-beside-calls",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, edit(ANSWER, content=None)),
        "messages[3].content",
        "null only beside tool_calls",
        id="null-content-without-calls",
    ),
    # tool results
    pytest.param(
        line(USER, CALLS, edit(RESULT, tool_call_id="call_9"), ANSWER),
        "messages[2].tool_call_id",
        "'call_9' answers no earlier call",
        id="result-of-no-call",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, RESULT, ANSWER),
        "messages[3].tool_call_id",
        "call 'call_1' is already answered by messages[2]",
        id="result-twice",
    ),
    pytest.param(
        line(USER, CALLS, {"role": "user", "content": "and?"}, RESULT, ANSWER),
        "messages[3].role",
        "a tool message must follow an assistant turn with tool_calls",
        id="result-not-after-calls",
    ),
    pytest.param(
        line(USER, CALLS, without(RESULT, "tool_call_id"), ANSWER),
        "messages[2].tool_call_id",
        "missing key 'tool_call_id'",
        id="result-without-call-id",
    ),
    pytest.param(
        line(USER, CALLS, without(RESULT, "content"), ANSWER),
        "messages[2].content",
        "missing key 'content'",
        id="result-without-content",
    ),
    pytest.param(
        line(USER, CALLS, edit(RESULT, content={"temp": 18}), ANSWER),
        "messages[2].content",
        "must be a string, got an object",
        id="result-content-object",
    ),
    pytest.param(
        line(edit(USER, tool_calls=[call()]), CALLS, RESULT, ANSWER),
        "messages[0].tool_calls",
        "only assistant messages make tool calls",
        id="calls-on-user",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, edit(ANSWER, tool_call_id="call_1")),
        "messages[3].tool_call_id",
        "only tool messages carry a tool_call_id",
        id="call-id-on-assistant",
    ),
    # weight
    pytest.param(
        line(USER, CALLS, RESULT, edit(ANSWER, weight=2)),
        "messages[3].weight",
        "must be 0 or 1, got 2",
        id="weight-2",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, edit(ANSWER, weight=True)),
        "messages[3].weight",
        "must be 0 or 1, got true",
        id="weight-boolean",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, edit(ANSWER, weight=0.5)),
        "messages[3].weight",
        "must be 0 or 1, got 0.5",
        id="weight-fraction",
    ),
    pytest.param(
        line(edit(USER, weight=1), CALLS, RESULT, ANSWER),
        "messages[0].weight",
        "only assistant messages carry a weight",
        id="weight-on-user",
    ),
    pytest.param(
        line(USER, CALLS, edit(RESULT, weight=0), ANSWER),
        "messages[2].weight",
        "only assistant messages carry a weight",
        id="weight-on-tool",
    ),
    pytest.param(
        line(USER, edit(CALLS, weight=0), RESULT, edit(ANSWER, weight=0)),
        "messages",
        "every assistant turn has weight 0, so nothing to learn from",
        id="every-turn-weight-0",
    ),
    # tools
    pytest.param(
        as_line({"messages": [USER, ANSWER], "tools": WEATHER}),
        "tools",
        "must be a list, got an object",
        id="tools-not-list",
    ),
    pytest.param(
        line(USER, ANSWER, tools=("get_weather",)),
        "tools[0]",
        "must be an object, got a string",
        id="tool-not-object",
    ),
    pytest.param(
        line(USER, ANSWER, tools=(weather(name="get weather"),)),
        "tools[0].function.name",
        "is not 1-64 letters, digits, '_' or '-'",
        id="tool-name-space",
    ),
    pytest.param(
        line(USER, ANSWER, tools=(weather(name="f" * 65),)),
        "tools[0].function.name",
        "is not 1-64 letters",
        id="tool-name-too-long",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(WEATHER, WEATHER)),
        "tools[1].function.name",
        "function 'get_weather' is already defined by tools[0]",
        id="tool-defined-twice",
    ),
    pytest.param(
        line(USER, ANSWER, tools=({"type": "function"},)),
        "tools[0].function",
        "missing key 'function'",
        id="tool-without-function",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(edit(WEATHER, type="retrieval"),)),
        "tools[0].type",
        "must be 'function', got \"retrieval\"",
        id="tool-type",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(weather(parameters="city"),)),
        "tools[0].function.parameters",
        "must be a JSON schema object, got a string",
        id="tool-parameters-string",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(weather(parameters={"type": "array"}),)),
        "tools[0].function.parameters",
        "the schema's type must be 'object'",
        id="tool-parameters-array",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(weather(description=5),)),
        "tools[0].function.description",
        "must be a string, got a number",
        id="tool-description-number",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, tools=(weather(args={}),)),
        "tools[0].function.args",
        "unknown key 'args'",
        id="tool-unknown-key",
    ),
    pytest.param(
        line(USER, CALLS, RESULT, ANSWER, parallel_tool_calls="yes"),
        "parallel_tool_calls",
        "must be true or false, got a string",
        id="parallel-not-boolean",
    ),
    pytest.param(
        line(
            USER,
            edit(CALLS, tool_calls=[call("a"), call("b", "Rome")]),
            edit(RESULT, tool_call_id="a"),
            edit(RESULT, tool_call_id="b"),
            ANSWER,
            parallel_tool_calls=False,
        ),
        "messages[1].tool_calls",
        "makes several calls, but the line sets parallel_tool_calls to false",
        id="parallel-calls-when-false",
    ),
    # the legacy forms and other shapes
    pytest.param(
        as_line({"messages": [USER, ANSWER], "functions": [WEATHER["function"]]}),
        "functions",
        "the legacy 'functions' is not supported; list each function in 'tools'",
        id="legacy-functions",
    ),
    pytest.param(
        line(USER, edit(ANSWER, function_call={"name": "get_weather", "arguments": "{}"})),
        "messages[1].function_call",
        "the legacy 'function_call' is not supported; write the call in 'tool_calls'",
        id="legacy-function-call",
    ),
    pytest.param(
        line(USER, CALLS, {"role": "function", "content": "sunny"}, ANSWER),
        "messages[2].role",
        "the legacy role 'function' is not supported; answer a call with role 'tool'",
        id="legacy-function-role",
    ),
    pytest.param(
        as_line({"prompt": "hi", "completion": "hello", "tools": [WEATHER]}),
        "tools",
        "unknown key 'tools'",
        id="tools-on-prompt-completion",
    ),
    pytest.param(
        # Line 1 with other spacing in the call's arguments: the same content.
        line(
            USER | {"content": "Weather in City0?"},
            edit(CALLS, tool_calls=[call_with(arguments='{ "city" :"City0" }')]),
            RESULT,
            edit(ANSWER, content="It is 18 degrees in City0."),
        ),
        None,
        "exact duplicate of line 1",
        id="duplicate-up-to-argument-spacing",
    ),
]


def tool_lines(count: int, start: int = 0) -> list[bytes]:
    return [as_line(tool_chat(i)) for i in range(start, start + count)]


@pytest.mark.parametrize(("bad", "field", "phrase"), BAD_TOOL_LINES)
def test_bad_tool_line_is_reported_with_file_line_field(
    tmp_path: Path, bad: bytes, field: str | None, phrase: str
) -> None:
    path = write_lines(tmp_path, tool_lines(2) + [bad] + tool_lines(10, start=2))

    examples, problems = data.parse_examples(path)

    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert (problem.file, problem.line, problem.field) == (str(path), 3, field)
    assert phrase in problem.reason
    assert str(problem).startswith(f"{path}:3: ")
    assert [e.line for e in examples] == [1, 2, *range(4, 14)]


def test_tool_lines_read_into_examples_with_their_tools(tmp_path: Path) -> None:
    greeting = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "weight": 0},
    ]
    first = tool_chat(0)
    first["messages"][1] = without(first["messages"][1], "content")  # absent reads as null
    first["messages"][3]["weight"] = 1  # the default: not kept
    second = tool_chat(1) | {"parallel_tool_calls": True}
    second["messages"] = greeting + second["messages"]
    path = write_lines(tmp_path, [as_line(first), as_line(second)])

    one, two = data.read_examples(path)

    assert one.tools == (WEATHER,)
    assert one.parallel_tool_calls is None
    calls = [call(city="City0")]
    assert one.messages[1] == {"role": "assistant", "content": None, "tool_calls": calls}
    assert one.messages[2] == RESULT
    assert one.messages[3] == {"role": "assistant", "content": "It is 18 degrees in City0."}
    assert two.parallel_tool_calls is True
    assert two.messages[1] == {"role": "assistant", "content": "Hello!", "weight": 0}
    assert [data.is_trained(m) for m in two.messages] == [False, False, False, True] + [False, True]


def _sha(tmp_path: Path, obj: dict[str, Any]) -> str:
    return data.dataset_sha256(write_lines(tmp_path, [as_line(obj)], "one.jsonl"))


def _changed(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    obj = json.loads(json.dumps(tool_chat(0)))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


# (where in tool_chat(0) a value changes, the new value, whether the identity stays)
IDENTITY_CASES = [
    pytest.param(("messages", 1, "content"), "", True, id="empty-content-beside-calls"),
    pytest.param(("messages", 3, "weight"), 1, True, id="weight-1-is-the-default"),
    pytest.param(("messages", 3, "weight"), 0, False, id="weight-0"),
    pytest.param(("tools", 0, "function", "description"), "Other.", False, id="tool-description"),
    pytest.param(("messages", 1, "tool_calls", 0, "id"), "call_2", False, id="call-id"),
    pytest.param(
        ("messages", 1, "tool_calls", 0, "function", "arguments"),
        '{"city": "City0", "unit": "celsius"}',
        False,
        id="call-arguments",
    ),
    pytest.param(
        ("messages", 1, "tool_calls", 0, "function", "arguments"),
        '{\n  "city": "City0"\n}',
        True,
        id="call-arguments-spacing",
    ),
]


@pytest.mark.parametrize(("path", "value", "same"), IDENTITY_CASES)
def test_identity_covers_tools_calls_and_weight(
    tmp_path: Path, path: tuple[Any, ...], value: Any, same: bool
) -> None:
    changed = _changed(path, value)
    if path[-1] == "id":  # the answer names the call by its id: tool_call_id changes with it
        changed["messages"][2]["tool_call_id"] = value

    assert (_sha(tmp_path, changed) == _sha(tmp_path, tool_chat(0))) is same


def test_identity_of_a_plain_line_is_its_messages_alone() -> None:
    messages = (Message(role="user", content="a"), Message(role="assistant", content="b"))

    # As before tools were accepted: a plain dataset keeps its sha256 and its split.
    assert canonical_json(messages) == (
        '[{"content":"a","role":"user"},{"content":"b","role":"assistant"}]'
    )
    assert canonical_json(messages, [WEATHER]).startswith('{"messages":[{"content":"a"')


def test_prompt_and_reference_of_a_tool_example(tmp_path: Path) -> None:
    obj = tool_chat(0)
    obj["messages"].insert(0, {"role": "system", "content": "Use tools."})
    (ex,) = data.read_examples(write_lines(tmp_path, [as_line(obj)]))

    assert data.prompt_of(ex) == list(ex.messages[:2])
    assert data.reference_reply(ex) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "City0"}}\n</tool_call>'
    )


def test_prompt_and_reference_skip_turns_of_weight_zero(tmp_path: Path) -> None:
    obj = tool_chat(0)
    obj["messages"][1]["weight"] = 0
    (ex,) = data.read_examples(write_lines(tmp_path, [as_line(obj)]))

    assert data.prompt_of(ex) == list(ex.messages[:3])
    assert data.reference_reply(ex) == "It is 18 degrees in City0."
