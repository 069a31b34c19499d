"""Requests that once made a replica answer 500, or answer in the wrong shape: each is a
clear 4xx in OpenAI's error shape now, and the replica serves on."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from lora_ops.serving.limits import MAX_BODY_BYTES
from tests.serving.replicas import make_adapters

ADMIN = "bad-requests-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONTEXT = 48  # the engine's max_model_len, small so over-long prompts are cheap to build


@pytest.fixture(scope="module")
def root(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-requests")
    make_adapters(tiny_base, folder, ["acme"])
    return folder


@pytest.fixture(scope="module")
def engine(tiny_base: Path, root: Path) -> Iterator[Engine]:
    served = Engine(EngineConfig(tiny_base, max_model_len=CONTEXT, adapter_roots=[root]))
    served.load_adapter("acme", AdapterSource(str(root / "acme")))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ADMIN), raise_server_exceptions=False) as test_client:
        yield test_client


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "base", "prompt": "Hello", "max_tokens": 3, **fields}


# (route, body, status, words in the message)
CASES = [
    ("/v1/completions", completion(seed=2**70, temperature=1), 400, "seed"),
    ("/v1/completions", completion(seed=2**64 - 1, temperature=1), 200, ""),
    ("/v1/completions", completion(seed=-(2**63), temperature=1), 200, ""),
    ("/v1/completions", completion(temperature=2, top_p=1e-300), 200, ""),
    ("/v1/completions", completion(temperature=1e-300), 200, ""),
    ("/v1/completions", completion(stop=[]), 200, ""),
    ("/v1/completions", completion(stop=""), 400, "stop"),
    ("/v1/completions", completion(max_tokens=CONTEXT), 400, "maximum context length"),
    ("/v1/completions", completion(prompt="word " * 200, max_tokens=None), 400, "context"),
    ("/v1/completions", completion(prompt="Hi", max_tokens=None), 200, ""),
    ("/v1/completions", completion(model="nobody", stream=True), 404, "does not exist"),
    (
        "/v1/chat/completions",
        {"model": "acme", "messages": [{"role": "system", "content": "x"}], "max_tokens": 2},
        200,
        "",
    ),
    (
        "/v1/chat/completions",
        {"model": "acme", "messages": [{"role": "user", "content": ""}], "max_tokens": 2},
        200,
        "",
    ),
    ("/v1/load_lora_adapter", {"lora_name": "acme", "lora_path": "\x00"}, 400, "usable path"),
    ("/v1/load_lora_adapter", {"lora_name": "acme", "lora_path": "models:/junk"}, 400, "models:/"),
    (
        "/v1/load_lora_adapter",
        {"lora_name": "acme", "lora_path": "s3://other-bucket/adapters/acme"},
        400,
        "only the bucket",
    ),
    ("/v1/load_lora_adapter", {"lora_name": "acme", "lora_path": "/etc/passwd"}, 400, "outside"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "words"),
    CASES,
    ids=[
        "seed-beyond-64-bits",
        "seed-max",
        "seed-min",
        "top-p-rounds-to-zero",
        "temperature-underflows",
        "empty-stop-list",
        "empty-stop-string",
        "max-tokens-past-context",
        "prompt-past-context",
        "default-max-tokens-fits-context",
        "stream-unknown-model",
        "system-only-chat",
        "empty-user-message",
        "nul-in-path",
        "models-uri-not-an-adapter",
        "other-bucket",
        "a-file-outside-the-roots",
    ],
)
def test_bad_or_odd_requests_get_a_clear_answer(
    client: TestClient, route: str, body: dict[str, Any], status: int, words: str
) -> None:
    response = client.post(route, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert words in error["message"]
        assert error["type"] == "invalid_request_error"


def test_an_unparsable_body_is_400_in_openai_shape(client: TestClient) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    response = client.post("/v1/completions", content=b"\xff\xfe{", headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "body" in error["message"]
    assert error["type"] == "invalid_request_error"
    response = client.post("/v1/completions", content=b'{"model": ', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the body is not valid JSON"


def test_framework_errors_use_openai_shape(client: TestClient) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    wrong_method = client.delete("/v1/models")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET"


def test_a_huge_body_is_refused_before_parsing(client: TestClient) -> None:
    body = json.dumps(completion(prompt="x" * (MAX_BODY_BYTES + 1)))
    headers = {**AUTH, "content-type": "application/json"}
    response = client.post("/v1/completions", content=body, headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_random_paths_do_not_grow_the_metrics(client: TestClient) -> None:
    for index in range(20):
        client.get(f"/probe-{index}")
    metrics = client.get("/metrics").text
    assert "probe-" not in metrics
    assert 'route="other"' in metrics


def test_the_schema_documents_openai_errors_not_422(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    load = schema["paths"]["/v1/load_lora_adapter"]["post"]["responses"]
    assert "422" not in load
    assert set(load["400"]["content"]) == {"application/json"}
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "429"} <= set(chat)


def test_a_stream_whose_adapter_cannot_be_loaded_back_is_503(
    tiny_base: Path, root: Path, tmp_path: Path
) -> None:
    for name in ("acme", "globex"):
        shutil.copytree(root / "acme", tmp_path / name)
    engine = Engine(EngineConfig(tiny_base, max_adapters=1, adapter_roots=[tmp_path]))
    try:
        for name in ("acme", "globex"):
            engine.load_adapter(name, AdapterSource(str(tmp_path / name)))  # acme evicted
        (tmp_path / "acme" / "adapter_model.safetensors").write_bytes(b"changed on disk")
        with TestClient(create_app(engine, ADMIN)) as client:
            body = completion(model="acme", stream=True)
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 503
            assert response.json()["error"]["type"] == "service_unavailable"
            streamed = client.post("/v1/completions", json=completion(model="globex", stream=True))
            assert streamed.status_code == 200
            assert streamed.text.endswith("data: [DONE]\n\n")
    finally:
        engine.close()
