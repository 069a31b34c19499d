"""A real replica process (`lora-ops serve`) driven by the official openai client."""

from __future__ import annotations

import json
import pickle
import socket
import time
from collections.abc import Callable, Iterator
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
    args = ["--adapter-root", str(root)]
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


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples (every label set) on /metrics."""
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.split("{")[0].split()[0] == name)


def until(check: Callable[[], bool], what: str) -> None:
    """Wait for ``check``; the bound only guards against a hang, it is no timing claim."""
    deadline = time.monotonic() + 120
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_clients_that_disconnect_free_their_rows(client: openai.OpenAI, replica: str) -> None:
    abandoned = metric(replica, "lora_ops_abandoned_requests_total")
    body = {"model": "acme", "prompt": "Hi", "max_tokens": 1500, "ignore_eos": True}
    with httpx.stream("POST", replica + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event: it is running
    # Not streamed: the request sent whole, the connection closed before any answer.
    port = int(replica.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        until(lambda: metric(replica, "lora_ops_num_requests_running") >= 1, "never ran")
    until(
        lambda: metric(replica, "lora_ops_abandoned_requests_total") >= abandoned + 2,
        "disconnected requests were not dropped",
    )
    until(lambda: metric(replica, "lora_ops_num_requests_running") == 0, "rows still held")
    assert metric(replica, "lora_ops_kv_cache_usage_perc") == 0.0


def test_latency_histograms_and_cache_figures_are_exported(
    client: openai.OpenAI, replica: str
) -> None:
    client.completions.create(model="globex", prompt="Hello", max_tokens=4, temperature=0)
    text = httpx.get(replica + "/metrics", timeout=30).text
    for name in (
        "lora_ops_time_to_first_token_seconds_bucket",
        "lora_ops_inter_token_latency_seconds_bucket",
        "lora_ops_e2e_request_latency_seconds_count",
    ):
        lines = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert any('model_name="globex"' in line for line in lines), name
    for name in (
        "lora_ops_num_requests_waiting",
        "lora_ops_kv_cache_usage_perc",
        "lora_ops_num_preemptions_total",
        "lora_ops_prefix_cache_hits_total",
        "lora_ops_prefix_cache_queries_total",
    ):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
