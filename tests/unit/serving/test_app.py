"""The app ``create_app`` builds: readiness, and the request metrics its middleware keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lora_ops import base_models
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def client(tiny_base: Path) -> Iterator[TestClient]:
    engine = Engine(EngineConfig(tiny_base))
    with TestClient(create_app(engine)) as test_client:
        yield test_client
    engine.close()


def test_health_is_503_until_the_app_is_ready(client: TestClient) -> None:
    state = client.app.state  # type: ignore[attr-defined]
    state.ready = False
    try:
        loading = client.get("/health")
    finally:
        state.ready = True
    assert loading.status_code == 503
    assert loading.json()["status"] == "loading"
    assert client.get("/health").json()["status"] == "ok"


def test_health_names_the_base_and_its_weights(client: TestClient, tiny_base: Path) -> None:
    health = client.get("/health").json()
    assert health["base"] == "tiny-llama"
    assert health["base_sha256"] == base_models.base_sha256(tiny_base)


def test_metrics_name_the_apps_routes_and_lump_other_paths(client: TestClient) -> None:
    client.get("/v1/models")
    client.get("/not-a-route")
    metrics = client.get("/metrics").text
    assert 'lora_ops_requests_total{route="/v1/models",status="200"}' in metrics
    assert 'lora_ops_requests_total{route="other",status="404"}' in metrics
    assert "not-a-route" not in metrics
