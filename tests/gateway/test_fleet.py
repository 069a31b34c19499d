"""The gateway in front of real replica processes (`lora-ops serve`, tiny-llama), through
the official openai client: the same answers as the replica's own, keys held at the door,
a killed replica routed around, a replica's refusal passed through."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lora_ops.gateway import StaticRouter, create_gateway
from lora_ops.serving.access import KeyGrant, load_api_keys
from tests.gateway.fakes import FakeReplica, SpyRouter, answer, sample, served
from tests.serving.replicas import TOKEN, Replica, make_adapters

pytestmark = pytest.mark.integration

ACME_KEY = "acme-gateway-key-0123456789"
GLOBEX_KEY = "globex-gateway-key-0123456789"
REPLICA_KEY = (
    "replica-only-key-0123456789"  # the replica wants a key; the gateway brings the admin token
)
CHAT = [{"role": "user", "content": "Price of the Pro Anvil?"}]


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_base, tmp_path_factory.mktemp("adapters"), ["acme", "globex"])


@pytest.fixture(scope="module")
def replica(
    tiny_base: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("replica")
    keys = folder / "keys.json"
    keys.write_text(json.dumps({REPLICA_KEY: {"customer": "acme"}}))
    root = adapters["acme"].parent
    args = ["--adapter-root", str(root), "--api-keys", str(keys)]
    with Replica(tiny_base, folder / "replica.log", args) as running:
        for name, path in adapters.items():
            assert running.load(name, path).status_code == 200
        yield running.url


@pytest.fixture(scope="module")
def grants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyGrant]:
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    grants = {
        ACME_KEY: {"customer": "acme"},
        GLOBEX_KEY: {"customer": "globex", "allow_base": True},
    }
    keys.write_text(json.dumps(grants))
    return load_api_keys(keys)


@pytest.fixture(scope="module")
def gateway(replica: str, grants: dict[str, KeyGrant]) -> Iterator[str]:
    router = StaticRouter({"base": [replica], "acme": [replica], "globex": [replica]})
    with served(create_gateway(router, TOKEN, grants, timeout_s=120)) as url:
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    # No retries of the client's own: each request's outcome is the gateway's.
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def without_ids(answer: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = answer.model_dump()
    for varying in ("id", "created"):
        dumped.pop(varying, None)
    return dumped


@pytest.mark.parametrize(("model", "key"), [("acme", ACME_KEY), ("base", GLOBEX_KEY)])
def test_completions_and_chat_equal_the_replicas_own(
    gateway: str, replica: str, model: str, key: str
) -> None:
    ours, theirs = client(gateway, key), client(replica, TOKEN)
    ask: dict[str, Any] = {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    assert without_ids(ours.completions.create(**ask)) == without_ids(
        theirs.completions.create(**ask)
    )
    chat: dict[str, Any] = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    assert without_ids(ours.chat.completions.create(**chat)) == without_ids(
        theirs.chat.completions.create(**chat)
    )


def test_a_stream_equals_the_replicas_own_chunk_for_chunk(gateway: str, replica: str) -> None:
    ask: dict[str, Any] = {
        "model": "acme",
        "messages": CHAT,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    ours = [without_ids(c) for c in client(gateway, ACME_KEY).chat.completions.create(**ask)]
    theirs = [without_ids(c) for c in client(replica, TOKEN).chat.completions.create(**ask)]
    assert ours == theirs
    assert len(ours) > 3


def test_a_key_reaches_its_own_model_and_lists_only_what_it_reaches(gateway: str) -> None:
    acme, globex = client(gateway, ACME_KEY), client(gateway, GLOBEX_KEY)
    assert [m.id for m in acme.models.list()] == ["acme"]
    assert [m.id for m in globex.models.list()] == ["base", "globex"]
    assert acme.completions.create(model="acme", prompt="Hi", max_tokens=2).choices
    for model in ("globex", "base"):
        with pytest.raises(openai.PermissionDeniedError, match=model) as refused:
            acme.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert refused.value.body["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-key-at-all-000000").models.list()


def test_a_replicas_400_comes_back_unchanged_and_is_not_retried(replica: str) -> None:
    bad = {"model": "acme", "prompt": "x", "temperature": 7}
    with FakeReplica(answer(200, {"never": "asked"})) as spare:
        router = SpyRouter({"acme": [replica, spare.url]})
        with TestClient(create_gateway(router, TOKEN, None, 120)) as gateway:
            ours = gateway.post("/v1/completions", json=bad)
            retries = sample(gateway.get("/metrics").text, "lora_ops_gateway_retries_total")
        assert spare.received == []
    theirs = httpx.post(
        replica + "/v1/completions",
        json=bad,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert (ours.status_code, ours.json()) == (400, theirs.json())
    assert "temperature" in ours.json()["error"]["message"]
    assert router.reports == [(replica, True, "answered 400")]
    assert retries == 0


def test_a_killed_replica_is_routed_around(tiny_base: Path, replica: str, tmp_path: Path) -> None:
    with Replica(tiny_base, tmp_path / "doomed.log", []) as doomed:
        router = SpyRouter({"base": [doomed.url, replica]})
        with served(create_gateway(router, TOKEN, None, timeout_s=120)) as url:
            ours = client(url, TOKEN)
            ask: dict[str, Any] = {
                "model": "base",
                "prompt": "Hi",
                "max_tokens": 4,
                "temperature": 0,
            }
            before = ours.completions.create(**ask).choices[0].text
            assert router.reports == [(doomed.url, True, "")]
            assert doomed.process is not None
            doomed.process.kill()
            doomed.process.wait(timeout=60)
            after = [ours.completions.create(**ask).choices[0].text for _ in range(4)]
            streamed = "".join(
                c.choices[0].text for c in ours.completions.create(**ask, stream=True)
            )
            text = httpx.get(url + "/metrics", timeout=30).text
    assert after == [before] * 4
    assert streamed == before
    assert router.failures() == [doomed.url]
    assert sample(text, "lora_ops_gateway_retries_total") == 1
    assert sample(text, "lora_ops_gateway_failovers_total") == 1
    requests = "lora_ops_gateway_requests_total"
    assert sample(text, requests, replica=doomed.url, bucket="base", outcome="failed") == 1
    assert sample(text, requests, replica=replica, bucket="base", outcome="ok") == 5


def test_a_replica_says_through_the_gateway_that_the_adapter_was_resident(replica: str) -> None:
    ask = {"model": "acme", "prompt": "Hi", "max_tokens": 2}
    with TestClient(create_gateway(SpyRouter({"acme": [replica]}), TOKEN, None, 120)) as gateway:
        reply = gateway.post("/v1/completions", json=ask)
        text = gateway.get("/metrics").text
    assert reply.status_code == 200
    assert reply.headers["x-lora-ops-adapter"] == "resident"  # loaded at start, room for 1,024
    assert "lora_ops_gateway_cold_routes_total{" not in text
