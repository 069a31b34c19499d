"""The ``x-lora-ops-adapter`` header: whether a request's adapter was resident on arrival.

One adapter fits in the model at a time here, so which answer is cold is certain: the
adapter loaded last is resident, and asking for the other one evicts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lora_ops import base_models
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from lora_ops.serving.routes import ADAPTER_HEADER
from tests.helpers import randomize_adapter

ADMIN = "residency-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("residency")
    engine = Engine(EngineConfig(tiny_base, max_adapters=1))
    for seed, name in enumerate(["acme", "globex"]):
        model = base_models.load_model(tiny_base, "cpu")
        apply_lora(model, LoraSpec(r=2), adapter=name)
        randomize_adapter(model, name, seed=seed)
        engine.load_adapter(
            name, AdapterSource(str(save_adapter(model, root / name, adapter=name)))
        )
    yield engine
    engine.close()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ADMIN)) as test_client:
        yield test_client


def residency(client: TestClient, model: str, chat: bool = False, stream: bool = False) -> str:
    """The header of one answered request (``none`` when it has none)."""
    if chat:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 2, "stream": stream}
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
    else:
        body = {"model": model, "prompt": "Hi", "max_tokens": 2, "stream": stream}
        reply = client.post("/v1/completions", json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    return reply.headers.get(ADAPTER_HEADER, "none")


def test_an_adapter_made_resident_by_a_request_is_resident_for_the_next(
    client: TestClient, engine: Engine
) -> None:
    residency(client, "globex")  # whatever was resident before, acme is not now
    misses = engine.stats.cache_misses
    assert residency(client, "acme") == "cold"
    assert residency(client, "acme") == "resident"
    assert residency(client, "acme", chat=True) == "resident"
    assert engine.stats.cache_misses == misses + 1  # one cold load, as the header said


def test_alternating_two_adapters_in_a_cache_of_one_is_cold_every_time(
    client: TestClient, engine: Engine
) -> None:
    residency(client, "globex")
    misses = engine.stats.cache_misses
    answers = [
        residency(client, "acme"),
        residency(client, "globex", chat=True),
        residency(client, "acme", stream=True),
        residency(client, "globex", chat=True, stream=True),
    ]
    assert answers == ["cold"] * 4
    assert engine.stats.cache_misses == misses + 4


@pytest.mark.parametrize(("chat", "stream"), [(False, False), (True, True)])
def test_the_base_model_has_no_header(client: TestClient, chat: bool, stream: bool) -> None:
    assert residency(client, "base", chat=chat, stream=stream) == "none"


def test_a_refused_request_has_no_header(client: TestClient) -> None:
    body = {"model": "acme", "prompt": "Hi", "max_tokens": 0}
    reply = client.post("/v1/completions", json=body, headers=AUTH)
    assert reply.status_code == 400
    assert ADAPTER_HEADER not in reply.headers
