"""A real replica process (`lora-ops serve`) driven by the official openai client."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from lora_ops.files import sha256_file
from tests.servers import free_port
from tests.serving.replicas import TOKEN, Replica, make_adapters

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(
        tiny_base, tmp_path_factory.mktemp("adapters"), ["acme", "globex", "initech"]
    )


@pytest.fixture(scope="module")
def replica(
    tiny_base: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("replica") / "replica.log"
    root = adapters["acme"].parent
    args = ["--batch-window-ms", "200", "--adapter-root", str(root)]
    with Replica(tiny_base, log, args) as running:
        yield running.url


def admin(
    url: str, path: str, body: dict[str, object], token: str | None = TOKEN
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def client(replica: str, adapters: dict[str, Path]) -> openai.OpenAI:
    for name, folder in adapters.items():
        sha = sha256_file(folder / "adapter_model.safetensors")
        response = admin(
            replica,
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": str(folder), "sha256": sha},
        )
        assert response.status_code == 200, response.text
    return openai.OpenAI(base_url=replica + "/v1", api_key="unused")


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["base", "acme", "globex", "initech"]


def test_completions_and_chat_select_adapters_by_model(client: openai.OpenAI) -> None:
    replies = {}
    for model in ("base", "acme", "globex"):
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Price of the Pro Anvil?"}],
            max_tokens=6,
            temperature=0,
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage is not None
        assert chat.usage.completion_tokens <= 6
        replies[model] = chat.choices[0].message.content
    assert len(set(replies.values())) == 3
    text = client.completions.create(model="acme", prompt="Hello", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason in {"stop", "length"}
    assert text.object == "text_completion"


def test_streaming_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about shipping."}]
    whole = client.chat.completions.create(
        model="globex", messages=messages, max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(
        model="globex", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="'nobody' does not exist"):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])


def test_bad_request_is_400_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="x", temperature=7)


def test_concurrent_requests_share_batches(client: openai.OpenAI, replica: str) -> None:
    def ask(model: str) -> str:
        result = client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0)
        return result.choices[0].text

    models = ["acme", "globex", "initech", "base"] * 2
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(ask, models))
    assert answers[:4] == answers[4:]
    metrics = httpx.get(replica + "/metrics").text
    largest = next(
        line for line in metrics.splitlines() if line.startswith("lora_ops_max_batch_size ")
    )
    assert float(largest.split()[1]) >= 2
    assert "lora_ops_cache_hits_total" in metrics


def test_admin_needs_the_token_and_bad_adapters_are_refused(
    client: openai.OpenAI, replica: str, adapters: dict[str, Path]
) -> None:
    body = {"lora_name": "hooli", "lora_path": str(adapters["acme"])}
    assert admin(replica, "/v1/load_lora_adapter", body, token=None).status_code == 401
    assert admin(replica, "/v1/load_lora_adapter", body, token="wrong").status_code == 403
    assert (
        admin(replica, "/v1/unload_lora_adapter", {"lora_name": "acme"}, token=None).status_code
        == 401
    )
    tampered = admin(replica, "/v1/load_lora_adapter", {**body, "sha256": "0" * 64})
    assert tampered.status_code == 400
    assert "does not match the sha256" in tampered.json()["error"]["message"]
    pickled = adapters["acme"].parent / "pickled"  # inside the adapter root
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes(
        (adapters["acme"] / "adapter_config.json").read_bytes()
    )
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"a": 1}))
    refused = admin(
        replica, "/v1/load_lora_adapter", {"lora_name": "hooli", "lora_path": str(pickled)}
    )
    assert refused.status_code == 400
    assert "never loaded" in refused.json()["error"]["message"]
    assert "hooli" not in [m.id for m in client.models.list()]
    still = client.completions.create(model="acme", prompt="Hi", max_tokens=3, temperature=0)
    assert still.choices[0].text is not None


def test_a_replica_with_no_registry_serves_at_once_and_says_so_once(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--adapter-root", str(adapters["acme"].parent)]
    env = {"MLFLOW_TRACKING_URI": dead}
    with Replica(tiny_base, tmp_path / "r.log", args, env=env, bootstrap=True) as replica:
        assert replica.complete("base").status_code == 200
        sha = sha256_file(adapters["acme"] / "adapter_model.safetensors")
        assert replica.load("acme", adapters["acme"], sha).status_code == 200
        assert replica.complete("acme").status_code == 200
        logged = replica.log.read_text()
    assert logged.count(f"MLflow at {dead} is unreachable") == 1, logged
    assert "serving the base model and adapters loaded through the API" in logged
    assert "Retrying" not in logged  # MLflow's client was never left to retry a dead server
