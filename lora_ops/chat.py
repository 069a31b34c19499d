"""Chats in OpenAI's shape rendered through a base's chat template, tools included.

Training and serving render a conversation here, so an adapter fine-tuned on tool calls
meets the same text when it serves. Messages are OpenAI's: roles ``system`` (``developer``
is read as ``system``), ``user``, ``assistant`` (with optional ``tool_calls``) and ``tool``
(with ``tool_call_id``); content is a string, ``None`` (an assistant turn that only calls
tools) or a list of text parts.

Where the base's template takes ``tools`` (its source uses the variable), tools and tool
turns go to the template as transformers documents them. Otherwise they are written the
way Hermes and Qwen 2.5 templates write them, which small instruct bases can be taught
with a few hundred examples: the function signatures in the system turn inside
``<tools></tools>``, each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
in the assistant's turn, and tool results as a user turn of ``<tool_response>`` blocks.
:func:`parse_tool_calls` reads both that form and a bare ``{"name", "arguments"}`` object
(what Llama 3.1's template asks for) back into calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints: importing this module stays cheap (CLI start-up)
    from transformers import PreTrainedTokenizerBase

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FORMAT = (
    "</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made; ``arguments`` is JSON text, as OpenAI returns it."""

    name: str
    arguments: str
    id: str = ""

    def openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True)
class ParsedReply:
    content: str | None  # text outside the calls; None when the reply is calls only
    tool_calls: list[ToolCall]


def text_of(content: Any) -> str:
    """A message's text: a string as is, text (and refusal) parts joined, ``None`` as empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", part.get("refusal", "")) for part in content)


def _said(message: Mapping[str, Any]) -> str:
    """What a turn says; an assistant's refusal is what it said when there is no content."""
    return text_of(message.get("content")) or message.get("refusal") or ""


def template_takes_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool,
) -> str:
    """The conversation as the base's template writes it (tools too), ready to tokenize."""
    from jinja2.exceptions import TemplateError  # loaded with transformers' tokenizer already

    native = bool(tools) and template_takes_tools(tokenizer)
    rendered = (
        [_native_message(m) for m in messages] if native else _hermes_messages(messages, tools)
    )
    try:
        text = tokenizer.apply_chat_template(
            rendered,
            tools=[dict(tool) for tool in tools or ()] if native else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as e:
        raise InputError(
            f"the chat template refused this conversation: {e}", field="messages"
        ) from e
    if not isinstance(text, str):
        raise InputError("the chat template did not render text", field="chat_template")
    return text


def encode_chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Prompt ids of a chat with the assistant's turn opened."""
    text = render_chat(tokenizer, messages, tools, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _native_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers' tool-aware templates take it (arguments as objects)."""
    role = "system" if message["role"] == "developer" else message["role"]
    out: dict[str, Any] = {"role": role, "content": _said(message)}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": json.loads(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
    if role == "tool" and message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _hermes_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Tools, calls and results written into plain system, user and assistant turns."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        content = _said(message)
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_block(call) for call in message["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_resp"):
                out[-1]["content"] += "\n" + block  # one user turn for consecutive results
                continue
            role, content = "user", block
        out.append({"role": role, "content": content})
    if tools:
        signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        section = f"{_TOOLS_PREAMBLE}\n{signatures}\n{_TOOLS_FORMAT}"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def assistant_text(message: Mapping[str, Any]) -> str:
    """An assistant turn's text as written for a template that takes no tools: its content,
    then one ``<tool_call>`` block per call (the reference reply of a tool-calling turn)."""
    content = text_of(message.get("content"))
    calls = [_call_block(call) for call in message.get("tool_calls") or ()]
    return "\n".join(([content] if content else []) + calls)


def _call_block(call: Mapping[str, Any]) -> str:
    function = call["function"]
    body = {"name": function["name"], "arguments": json.loads(function["arguments"])}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


# -- reading calls back ----------------------------------------------------------------------


def parse_tool_calls(text: str, tool_names: Sequence[str]) -> ParsedReply:
    """The calls in a reply, and the text around them.

    A ``<tool_call>`` block whose body is not a call of a known tool stays text, as does a
    bare JSON object that is not one: the caller sees what the model said.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for block in _CALL_BLOCK.finditer(text):
        call = _as_call(block.group(1), tool_names)
        kept.append(text[position : block.start()] if call else text[position : block.end()])
        position = block.end()
        if call:
            calls.append(call)
    kept.append(text[position:])
    rest = "".join(kept).strip()
    if not calls:
        bare = _as_call(rest, tool_names)
        if bare:
            return ParsedReply(None, [bare])
    return ParsedReply(rest or None, calls)


def _as_call(body: str, tool_names: Sequence[str]) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(
        name=value["name"],
        arguments=json.dumps(arguments, ensure_ascii=False),
        id=f"call_{uuid.uuid4().hex[:24]}",
    )
