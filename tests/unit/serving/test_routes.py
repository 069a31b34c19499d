"""Who may call which route, and which of a request's problems is answered first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lora_ops.serving.access import load_api_keys
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import Engine, EngineConfig

ADMIN = "admin-token-for-route-tests"
ACME_KEY = "acme-key-for-route-tests-0123456"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    keys = tmp_path_factory.mktemp("route-keys") / "keys.json"
    keys.write_text(json.dumps({ACME_KEY: {"customer": "acme"}}))
    engine = Engine(EngineConfig(tiny_base))
    with TestClient(create_app(engine, ADMIN, load_api_keys(keys))) as test_client:
        yield test_client
    engine.close()


BAD, NO_KEY, DENIED = "invalid_request_error", "authentication_error", "permission_error"
LOAD = {"lora_name": "x", "lora_path": "/x"}
# (route, body, key, status, error type): a malformed body is a 400 for any caller; a
# well-formed one meets the key check.
CASES = [
    ("/v1/completions", {"prompt": 1}, None, 400, BAD),
    ("/v1/completions", {"model": "acme", "prompt": "Hi"}, None, 401, NO_KEY),
    ("/v1/completions", {"model": "base", "prompt": "Hi"}, ACME_KEY, 403, DENIED),
    ("/v1/chat/completions", {"model": "acme", "messages": []}, None, 400, BAD),
    ("/v1/chat/completions", {"model": "base", "messages": HELLO}, ACME_KEY, 403, DENIED),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, None, 400, BAD),
    ("/v1/load_lora_adapter", LOAD, None, 401, NO_KEY),
    ("/v1/load_lora_adapter", LOAD, ACME_KEY, 403, DENIED),
    ("/v1/unload_lora_adapter", {}, ACME_KEY, 400, BAD),
    ("/v1/unload_lora_adapter", {"lora_name": "x"}, ACME_KEY, 403, DENIED),
]


@pytest.mark.parametrize(
    ("route", "body", "key", "status", "kind"),
    CASES,
    ids=[
        "completion-malformed-no-key",
        "completion-no-key",
        "completion-other-model",
        "chat-malformed-no-key",
        "chat-other-model",
        "load-malformed-no-token",
        "load-no-token",
        "load-customer-key",
        "unload-malformed-customer-key",
        "unload-customer-key",
    ],
)
def test_the_body_is_checked_before_the_caller(
    client: TestClient, route: str, body: dict[str, Any], key: str | None, status: int, kind: str
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = client.post(route, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == kind


def test_a_models_list_needs_a_key_where_keys_are_set(client: TestClient) -> None:
    refused = client.get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == NO_KEY


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200
