"""Data files and examples the data tests build, and the label runs they read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lora_ops.data import IGNORE_INDEX, Example, Message, Role, TokenizedExample

END = "<|im_end|>"  # SmolLM2's end-of-turn marker
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
SYSTEM = {"role": "system", "content": "be brief"}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def call(call_id: str = "call_1", city: str = "Paris", name: str = "get_weather") -> dict[str, Any]:
    """One tool call in OpenAI's shape, arguments as JSON text."""
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_chat(i: int) -> dict[str, Any]:
    """A valid tool-calling conversation, unique per i: ask, call, result, answer."""
    city = f"City{i}"
    return {
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call("call_1", city)]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
            {"role": "assistant", "content": f"It is 18 degrees in {city}."},
        ],
        "tools": [WEATHER],
    }


def chat(i: int) -> dict[str, Any]:
    """A valid one-turn conversation, unique per i."""
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": f"It is {i + 1}."},
        ]
    }


def as_line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def write_lines(tmp_path: Path, lines: list[bytes], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def valid_lines(count: int, start: int = 0) -> list[bytes]:
    return [as_line(chat(i)) for i in range(start, start + count)]


def example(*turns: tuple[Role, str], line: int = 1) -> Example:
    return Example(tuple(Message(role=r, content=c) for r, c in turns), line)


def label_runs(tokenizer: PreTrainedTokenizerBase, item: TokenizedExample) -> list[str]:
    """Decode each contiguous run of label tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in item.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [str(tokenizer.decode(run, skip_special_tokens=False)) for run in runs]
