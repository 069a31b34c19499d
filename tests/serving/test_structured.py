"""Structured outputs, logprobs, n and best_of on tiny-llama: the engine and the replica's app.

A random model writes noise; a grammar makes that noise a valid instance of the schema, so
validity here is the grammar's doing alone. Orderings that matter (two rows in one batch)
are made by holding the engine at a callback, never by timing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from lora_ops import base_models
from lora_ops.generation import Delta, SamplingParams
from lora_ops.lora import adapters_in_use, load_adapter
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from tests.serving.replicas import make_adapters

ADMIN = "structured-admin-token"
CUSTOMERS = [f"customer-{i}" for i in range(10)]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["answer", "count", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_base, tmp_path_factory.mktemp("structured"), CUSTOMERS)


@pytest.fixture(scope="module")
def engine(tiny_base: Path, adapters: dict[str, Path]) -> Iterator[Engine]:
    served = Engine(EngineConfig(tiny_base, max_batch_size=16))
    for name, folder in adapters.items():
        served.load_adapter(name, AdapterSource(str(folder)))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[openai.OpenAI]:
    with TestClient(create_app(engine, ADMIN)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN, http_client=http)


def chat_ids(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


class Gate:
    """A text callback that holds the engine at its first piece until ``release``."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.released = threading.Event()

    def __call__(self, _: int, __: Delta) -> None:
        if not self.released.is_set():
            self.holding.set()
            self.released.wait(timeout=120)


# -- structured outputs ----------------------------------------------------------------------


def test_200_schema_requests_over_10_adapters_in_mixed_batches_are_all_valid(
    engine: Engine,
) -> None:
    grammar = engine.grammars.json_schema(SCHEMA, field="response_format")
    constrained, free = [], []
    for i in range(200):
        params = SamplingParams(max_tokens=64, temperature=1.0, seed=i)
        prompt = chat_ids(engine, f"Describe order {i} as JSON.")
        model = CUSTOMERS[i % len(CUSTOMERS)]
        constrained.append(engine.submit(prompt, model, params, grammar=grammar))
        if i % 4 == 0:  # free rows, on other adapters, in the same batches
            free.append(engine.submit(prompt, CUSTOMERS[(i + 3) % 10], params))
    results = [future.result(timeout=600) for future in constrained]
    for future in free:
        future.result(timeout=600)

    for result in results:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert max(engine.stats.batch_sizes) > 1  # they did share batches


def test_a_constrained_row_and_a_free_row_in_one_batch_each_answer_as_alone(
    engine: Engine,
) -> None:
    grammar = engine.grammars.json_schema(SCHEMA, field="response_format")
    greedy = SamplingParams(max_tokens=40)
    prompt = chat_ids(engine, "Give me the order status.")
    alone_constrained = engine.submit(prompt, "customer-1", greedy, grammar=grammar).result(120)
    alone_free = engine.submit(prompt, "customer-2", greedy).result(120)

    gate = Gate()
    holder = SamplingParams(max_tokens=60, ignore_eos=True)
    held = engine.submit(chat_ids(engine, "hold"), "customer-3", holder, on_text=gate)
    assert gate.holding.wait(timeout=120)
    batch_before = dict(engine.stats.batch_sizes)
    together = [
        engine.submit(prompt, "customer-1", greedy, grammar=grammar),
        engine.submit(prompt, "customer-2", greedy),
    ]
    gate.released.set()
    constrained, free = (future.result(timeout=120) for future in together)
    held.result(timeout=120)

    assert constrained.text == alone_constrained.text
    assert free.text == alone_free.text
    assert constrained.text != free.text
    grown = {
        size: n for size, n in engine.stats.batch_sizes.items() if n > batch_before.get(size, 0)
    }
    assert max(grown) >= 3  # the holder and both rows decoded in one forward


def test_json_schema_over_http_through_the_official_client(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="customer-4",
        messages=[{"role": "user", "content": "Order 7 as JSON"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "order", "schema": SCHEMA, "strict": True},
        },
        temperature=0.7,
        seed=11,
        max_completion_tokens=64,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_field(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}},
            },
        )
    assert refused.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


# -- log probabilities -----------------------------------------------------------------------


def test_logprobs_match_a_direct_forward_pass(
    engine: Engine, tiny_base: Path, adapters: dict[str, Path]
) -> None:
    prompt = chat_ids(engine, "Where is my anvil?")
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3)
    result = engine.submit(prompt, "customer-5", params).result(timeout=120)

    model = base_models.load_model(tiny_base, "cpu")
    load_adapter(model, adapters["customer-5"], "customer-5")
    ids = torch.tensor([prompt + result.token_ids])
    with torch.no_grad(), adapters_in_use(model, "customer-5"):
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    expected = [logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(result.token_ids)]

    assert result.logprobs is not None
    assert len(result.logprobs) == len(result.token_ids)
    total = sum(t.logprob for t in result.logprobs)
    assert total == pytest.approx(float(sum(expected)), abs=1e-3)
    for i, entry in enumerate(result.logprobs):
        top = torch.topk(logprobs[len(prompt) - 1 + i], 3).indices.tolist()
        assert [token for token, _ in entry.top] == top
        assert entry.top[0][0] == entry.token  # greedy picks the likeliest


def test_chat_logprobs_stream_as_they_answer(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": "customer-6",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**asked)
    streamed = client.chat.completions.create(**asked, stream=True)
    entries = [
        e
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content or []
    ]

    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]


def test_completion_logprobs_take_openai_s_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="base", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens
    assert logprobs.token_logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


# -- n and best_of ---------------------------------------------------------------------------


def test_n_gives_n_choices_that_share_the_prompt(client: openai.OpenAI, engine: Engine) -> None:
    messages = [{"role": "user", "content": "Tell me a long story about anvils " * 6}]
    prompt_tokens = len(engine.encode_chat(messages))
    engine.planner.prefix_caching = False  # so the only reuse is the choices' sharing
    try:
        hits = engine.stats.prefix_hits
        reply = client.chat.completions.create(
            model="customer-7", messages=messages, n=3, max_tokens=6, temperature=1, seed=3
        )
    finally:
        engine.planner.prefix_caching = True

    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # seed + i: they differ
    block = engine.planner.block_size
    shared = (prompt_tokens - 1) // block * block
    assert engine.stats.prefix_hits - hits == 2 * shared > 0
    assert reply.usage
    assert reply.usage.prompt_tokens == prompt_tokens


def test_streamed_choices_each_say_their_index(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": "customer-8",
        "messages": [{"role": "user", "content": "Hi"}],
        "n": 2,
        "max_tokens": 5,
        "temperature": 1,
        "seed": 9,
    }
    whole = client.chat.completions.create(**asked)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_best_of_returns_the_likeliest(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": "base", "prompt": "The", "max_tokens": 5, "seed": 4}
    all_five = client.completions.create(**asked, n=5, temperature=1, logprobs=0)
    best = client.completions.create(**asked, n=2, best_of=5, temperature=1, logprobs=0)

    def likelihood(choice: Any) -> float:
        return float(sum(choice.logprobs.token_logprobs))

    ranked = sorted((likelihood(c) for c in all_five.choices), reverse=True)
    assert [likelihood(c) for c in best.choices] == pytest.approx(ranked[:2])


def test_every_token_s_logprob_is_streamed_even_when_its_text_was_held_back(
    client: openai.OpenAI,
) -> None:
    # Sampled noise from a random model ends mid-character now and then: the tokens whose
    # text was held back still bring their logprobs, in the stream's last chunks.
    for seed in range(8):
        asked: dict[str, Any] = {
            "model": "customer-9",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 12,
            "temperature": 1.5,
            "seed": seed,
            "logprobs": True,
        }
        whole = client.chat.completions.create(**asked)
        streamed = [
            entry.logprob
            for chunk in client.chat.completions.create(**asked, stream=True)
            for choice in chunk.choices
            for entry in (choice.logprobs.content if choice.logprobs else None) or []
        ]
        content = whole.choices[0].logprobs.content or []  # type: ignore[union-attr]
        assert streamed == pytest.approx([entry.logprob for entry in content])
