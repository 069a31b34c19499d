"""Customer-bound API keys and the admin token, through FastAPI's TestClient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lora_ops import base_models
from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from lora_ops.serving.access import load_api_keys
from lora_ops.serving.app import create_app
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig
from tests.helpers import randomize_adapter

ADMIN = "admin-token-for-access-tests"
ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"


@pytest.fixture(scope="module")
def client(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("access")
    keys = root / "keys.json"
    keys.write_text(
        json.dumps(
            {ACME_KEY: {"customer": "acme"}, GLOBEX_KEY: {"customer": "globex", "allow_base": True}}
        )
    )
    engine = Engine(EngineConfig(tiny_base))
    for seed, name in enumerate(["acme", "globex"]):
        model = base_models.load_model(tiny_base, "cpu")
        apply_lora(model, LoraSpec(r=2), adapter=name)
        randomize_adapter(model, name, seed=seed)
        engine.load_adapter(
            name, AdapterSource(str(save_adapter(model, root / name, adapter=name)))
        )
    with TestClient(create_app(engine, ADMIN, load_api_keys(keys))) as test_client:
        yield test_client
    engine.close()


def ask(client: TestClient, model: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": "Hi", "max_tokens": 2}
    return client.post("/v1/completions", json=body, headers=headers).status_code


@pytest.mark.parametrize(
    ("model", "key", "status"),
    [
        ("acme", ACME_KEY, 200),
        ("globex", ACME_KEY, 403),
        ("base", ACME_KEY, 403),
        ("base", GLOBEX_KEY, 200),
        ("acme", GLOBEX_KEY, 403),
        ("acme", None, 401),
        ("acme", "not-a-key-at-all-1234", 401),
        ("globex", ADMIN, 200),
    ],
    ids=[
        "own",
        "other-customer",
        "base-not-allowed",
        "base-allowed",
        "other-way",
        "no-key",
        "unknown-key",
        "admin",
    ],
)
def test_keys_reach_only_their_customer(
    client: TestClient, model: str, key: str | None, status: int
) -> None:
    assert ask(client, model, key) == status


def test_models_list_shows_only_what_the_key_may_use(client: TestClient) -> None:
    listing = client.get("/v1/models", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()
    assert [m["id"] for m in listing["data"]] == ["acme"]
    listing = client.get("/v1/models", headers={"Authorization": f"Bearer {GLOBEX_KEY}"}).json()
    assert [m["id"] for m in listing["data"]] == ["base", "globex"]


def test_customer_key_cannot_load_adapters(client: TestClient) -> None:
    body = {"lora_name": "initech", "lora_path": "/tmp"}
    response = client.post(
        "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {ACME_KEY}"}
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_bad_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"short": {"customer": "acme"}}))
    with pytest.raises(InputError, match="at least 16 characters"):
        load_api_keys(path)
    path.write_text(json.dumps({"x" * 20: {"customer": "../etc"}}))
    with pytest.raises(InputError, match="not a customer id"):
        load_api_keys(path)
