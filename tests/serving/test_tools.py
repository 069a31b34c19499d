"""Tool calling through the official client: calls forced by the functions' schemas, the
round trip back through a tool message, streaming, and an adapter fine-tuned on tool calls
then served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lora_ops.cli import app as cli
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig

ADMIN = "tools-admin-token"
TOOL_SAMPLE = Path(__file__).parents[2] / "examples" / "weather-tools.jsonl"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "What is the weather in Lisbon?"}]


@pytest.fixture(scope="module")
def engine(tiny_base: Path) -> Iterator[Engine]:
    served = Engine(EngineConfig(tiny_base))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[openai.OpenAI]:
    with TestClient(create_app(engine, ADMIN)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN, http_client=http)


def test_required_tool_choice_gives_a_call_that_fits_the_function(
    client: openai.OpenAI,
) -> None:
    for seed in range(5):
        reply = client.chat.completions.create(
            model="base",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER, CLOCK],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1,
            seed=seed,
            max_tokens=80,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls or []
        assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        if call.function.name == "get_weather":  # type: ignore[union-attr]
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        else:
            assert arguments == {}
        assert call.id.startswith("call_")


def test_a_tool_call_round_trip_through_the_official_client(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model="base",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice=named,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,
    )
    (call,) = first.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]

    conversation = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model="base",
        messages=conversation,  # type: ignore[arg-type]
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=12,
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.tool_calls is None
    assert answer.message.content


def test_the_tool_result_reaches_the_prompt(engine: Engine) -> None:
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and clear"},
    ]
    text = engine.decode(engine.encode_chat(messages, [WEATHER]))
    assert "<tool_response>\n21 degrees and clear\n</tool_response>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}' in text
    assert '"name": "get_weather"' in text.split("<tools>\n")[1].split("</tools>")[0]


def test_a_streamed_tool_call_arrives_as_a_tool_calls_delta(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="base",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    calls, content, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert content == ""  # the call's text is not leaked as content
    assert finish == "tool_calls"
    (call,) = calls
    assert call.index == 0
    assert call.function
    assert call.function.name == "get_weather"
    jsonschema.validate(
        json.loads(call.function.arguments or ""), WEATHER["function"]["parameters"]
    )


def test_an_adapter_trained_on_tool_calls_is_served_and_calls(
    engine: Engine, client: openai.OpenAI, tmp_path: Path
) -> None:
    data = tmp_path / "weather.jsonl"
    data.write_text("".join(TOOL_SAMPLE.read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "adapter"
    args = ["train", "--base", "tiny-llama", "--data", str(data), "--out", str(out)]
    options = ["--rank", "4", "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "512"]
    trained = CliRunner().invoke(cli, [*args, *options])
    assert trained.exit_code == 0, trained.output

    engine.load_adapter("weather-co", AdapterSource(str(out)))
    example = json.loads(data.read_text().splitlines()[0])
    # Two training steps teach a random model little: the city's length is bounded at
    # serving time, so its call ends within max_tokens.
    city = example["tools"][0]["function"]["parameters"]["properties"]["city"]
    city["maxLength"] = 16
    reply = client.chat.completions.create(
        model="weather-co",
        messages=[m for m in example["messages"] if m["role"] in ("system", "user")][:2],
        tools=example["tools"],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    (call, *_) = reply.choices[0].message.tool_calls or []
    tools = {t["function"]["name"]: t["function"] for t in example["tools"]}
    assert call.function.name in tools  # type: ignore[union-attr]
    parameters = tools[call.function.name].get("parameters")  # type: ignore[union-attr]
    if parameters:
        jsonschema.validate(json.loads(call.function.arguments), parameters)  # type: ignore[union-attr]
