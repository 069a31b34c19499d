"""Chats with tools rendered for a base's template, and tool calls read back from replies."""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from lora_ops.chat import encode_chat_ids, parse_tool_calls, render_chat
from lora_ops.generation import encode_chat

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_a_plain_chat_encodes_as_the_template_alone(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode_chat_ids(tiny_tokenizer, messages) == encode_chat(tiny_tokenizer, messages)


def test_text_parts_and_developer_read_as_plain_turns(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    parts = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        },
        {"role": "user", "content": "Hi"},
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tiny_tokenizer, parts, add_generation_prompt=True) == render_chat(
        tiny_tokenizer, plain, add_generation_prompt=True
    )


def test_tools_go_in_the_system_turn_and_results_in_one_user_turn(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for i in range(2)
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Oslo and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "cold"},
        {"role": "tool", "tool_call_id": "c1", "content": "warm"},
    ]
    text = render_chat(tiny_tokenizer, messages, [WEATHER], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(WEATHER) in text
    assert text.count("<tool_call>\n") == 3  # the format's example, and the two calls
    assert (
        "<tool_response>\ncold\n</tool_response>\n<tool_response>\nwarm\n</tool_response>" in text
    )
    assert text.count("<|im_start|>user") == 2


def test_a_template_that_takes_tools_renders_them_itself(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    template = (
        "{% for t in tools %}TOOL {{ t.function.name }}{{ '\\n' }}{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}"
        "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{{ '\\n' }}{% endfor %}"
    )
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = template
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    text = render_chat(tokenizer, messages, [WEATHER], add_generation_prompt=False)
    assert text == "TOOL get_weather\nuser: Oslo?\nassistant: CALL get_weather Oslo\n"


def test_calls_are_read_from_blocks_and_from_a_bare_object() -> None:
    parsed = parse_tool_calls(f"Let me check.\n{CALL}", ["get_weather"])
    assert parsed.content == "Let me check."
    (call,) = parsed.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})

    bare = parse_tool_calls(
        '{"name": "get_weather", "parameters": {"city": "Rome"}}', ["get_weather"]
    )
    assert bare.content is None
    assert json.loads(bare.tool_calls[0].arguments) == {"city": "Rome"}


def test_what_is_not_a_call_of_a_known_tool_stays_text() -> None:
    unknown = CALL.replace("get_weather", "launch")
    for text in (unknown, "<tool_call>\nnot json\n</tool_call>", '{"name": "launch"}', "plain"):
        parsed = parse_tool_calls(text, ["get_weather"])
        assert parsed.tool_calls == []
        assert parsed.content == text
