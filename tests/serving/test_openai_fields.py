"""Every field of OpenAI's request schema, as the ``openai`` package types it, is honoured
(200) or refused (400 naming it), and the README's table says which.

A new ``openai`` release that adds a field fails here until the field is placed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from lora_ops.serving.app import create_app
from lora_ops.serving.engine import Engine, EngineConfig
from lora_ops.serving.requests import CHAT_FIELDS, COMPLETION_FIELDS

ADMIN = "fields-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
README = Path(__file__).parents[2] / "README.md"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hi"}]

# (value, status) pairs per field: each honoured value answers 200, each refused one 400.
SHARED: dict[str, list[tuple[Any, int]]] = {
    "max_tokens": [(2, 200), (0, 400)],
    "temperature": [(0.5, 200), (3, 400)],
    "top_p": [(0.9, 200), (0, 400)],
    "stop": [(["x"], 200), ([""], 400)],
    "seed": [(7, 200)],
    "stream": [(False, 200)],
    "stream_options": [({"include_usage": True}, 400)],  # only with stream: see below
    "n": [(2, 200), (17, 400)],
    "presence_penalty": [(1.0, 200), (3, 400)],
    "frequency_penalty": [(-1.0, 200), (3, 400)],
    "logit_bias": [({"42": 5}, 200), ({"a": 1}, 400), ({"42": 101}, 400)],
    "user": [("u-1", 200)],
}
CHAT: dict[str, list[tuple[Any, int]]] = {
    **SHARED,
    "messages": [([{"role": "developer", "content": [{"type": "text", "text": "x"}]}], 200)],
    "model": [("base", 200), ("nobody", 404)],
    "max_completion_tokens": [(2, 200)],
    "logprobs": [(True, 200)],
    "top_logprobs": [(21, 400)],
    "response_format": [({"type": "json_object"}, 200), ({"type": "python"}, 400)],
    "tools": [([TOOL], 200)],
    "tool_choice": [("auto", 200), ("required", 400)],  # required needs tools
    "parallel_tool_calls": [(False, 200)],
    "safety_identifier": [("s-1", 200)],
    "prompt_cache_key": [("k", 200)],
    "prompt_cache_retention": [("in_memory", 200), ("24h", 400)],
    "service_tier": [("auto", 200), ("flex", 400)],
    "store": [(False, 200), (True, 400)],
    "metadata": [({"a": "b"}, 400)],
    "modalities": [(["text"], 200), (["text", "audio"], 400)],
    "audio": [({"voice": "alloy", "format": "wav"}, 400)],
    "prediction": [({"type": "content", "content": "x"}, 400)],
    "reasoning_effort": [("low", 400)],
    "verbosity": [("low", 400)],
    "web_search_options": [({}, 400)],
    "functions": [([{"name": "f"}], 400)],
    "function_call": [("auto", 400)],
    "moderation": [({"model": "x"}, 400)],
    "prompt_cache_options": [({"mode": "x"}, 400)],
}
COMPLETION: dict[str, list[tuple[Any, int]]] = {
    **SHARED,
    "model": [("base", 200)],
    "prompt": [([5, 6, 7], 200), (["a", "b"], 200), ([], 400)],
    "best_of": [(2, 200), (17, 400)],
    "echo": [(True, 200)],
    "logprobs": [(2, 200), (6, 400)],
    "suffix": [("tail", 400)],
}


def openai_fields(params: Any) -> set[str]:
    return set(params.CompletionCreateParamsBase.__annotations__)


@pytest.fixture(scope="module")
def client(tiny_base: Path) -> Iterator[TestClient]:
    engine = Engine(EngineConfig(tiny_base))
    with TestClient(create_app(engine, ADMIN)) as test_client:
        yield test_client
    engine.close()


def test_every_openai_field_is_placed() -> None:
    for params, table, samples in (
        (chat_create_params, CHAT_FIELDS, CHAT),
        (completion_create_params, COMPLETION_FIELDS, COMPLETION),
    ):
        fields = openai_fields(params)
        assert fields - set(table) == set(), "fields the replica does not place"
        assert fields - {"messages", "prompt", "model"} - set(samples) == set()


@pytest.mark.parametrize(
    ("field", "value", "status"), [(f, v, s) for f, cases in CHAT.items() for v, s in cases]
)
def test_chat_fields_are_honoured_or_refused(
    client: TestClient, field: str, value: Any, status: int
) -> None:
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 3, field: value}
    answered = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert answered.status_code == status, answered.text
    if status == 400:
        assert answered.json()["error"]["param"].split(".")[0] in (field, "tool_choice")


@pytest.mark.parametrize(
    ("field", "value", "status"), [(f, v, s) for f, cases in COMPLETION.items() for v, s in cases]
)
def test_completion_fields_are_honoured_or_refused(
    client: TestClient, field: str, value: Any, status: int
) -> None:
    body = {"model": "base", "prompt": "Hello", "max_tokens": 3, field: value}
    answered = client.post("/v1/completions", json=body, headers=AUTH)
    assert answered.status_code == status, answered.text
    if status == 400:
        assert answered.json()["error"]["param"].split(".")[0] == field


def test_stream_options_with_stream_are_honoured(client: TestClient) -> None:
    body = {"model": "base", "prompt": "Hi", "max_tokens": 3, "stream": True}
    options = {"include_usage": True, "include_obfuscation": True}
    events = client.post("/v1/completions", json={**body, "stream_options": options}, headers=AUTH)
    chunks = [line[6:] for line in events.text.splitlines() if line.startswith("data: {")]
    last = __import__("json").loads(chunks[-1])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] >= 1
    assert all('"obfuscation"' in chunk for chunk in chunks[:-1])


def test_a_field_outside_openai_s_schema_is_refused_in_openai_s_words(
    client: TestClient,
) -> None:
    body = {"model": "base", "prompt": "Hi", "max_tokens": 2, "top_k": 5}
    answered = client.post("/v1/completions", json=body, headers=AUTH)
    assert answered.status_code == 400
    error = answered.json()["error"]
    assert error["message"] == "Unrecognized request argument supplied: top_k"
    assert error["param"] == "top_k"


def test_an_image_part_is_refused(client: TestClient) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    body = {"model": "base", "messages": [{"role": "user", "content": [image]}]}
    answered = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert answered.status_code == 400
    assert "image_url content is not supported" in answered.json()["error"]["message"]


def test_the_readme_lists_every_field() -> None:
    section = README.read_text().split("### OpenAI fields")[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert set(CHAT_FIELDS) | set(COMPLETION_FIELDS) <= listed


def test_an_assistant_call_whose_arguments_are_not_an_object_is_refused(
    client: TestClient,
) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    body = {"model": "base", "messages": messages, "tools": [TOOL]}
    answered = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert answered.status_code == 400
    assert answered.json()["error"]["param"] == "tool_calls.arguments"


def test_token_ids_beyond_the_vocabulary_are_refused(client: TestClient) -> None:
    for field, extra in (
        ("prompt", {"prompt": [1, 2**40]}),
        ("logit_bias", {"logit_bias": {"99999999": 1}}),
    ):
        body = {"model": "base", "prompt": "Hi", "max_tokens": 2, **extra}
        answered = client.post("/v1/completions", json=body, headers=AUTH)
        assert answered.status_code == 400, answered.text
        assert answered.json()["error"]["param"] == field
