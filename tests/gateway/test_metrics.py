"""What the gateway counts: requests by customer bucket, cold routes, traffic per model.

The replicas are :class:`~tests.gateway.fakes.FakeReplica` scripts that say exactly what a
lora-ops replica (or vLLM, with no residency header) would answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from lora_ops.gateway import Traffic, create_gateway, gateway_of
from lora_ops.gateway.metrics import CUSTOMER_BUCKETS, customer_bucket
from tests.gateway.fakes import (
    DONE,
    FakeReplica,
    SpyRouter,
    answer,
    completion_event,
    drop,
    sample,
    stream,
)
from tests.servers import free_ports

ADMIN = "gateway-admin-token-for-tests"
COMPLETION = {"object": "text_completion", "choices": [{"index": 0, "text": "hi"}]}
ASK = {"model": "acme", "prompt": "Hello", "max_tokens": 2}
COLD = {"x-lora-ops-adapter": "cold"}
RESIDENT = {"x-lora-ops-adapter": "resident"}
EVENTS = [completion_event("Hi", "stop"), DONE]


@contextmanager
def gateway(router: SpyRouter, traffic: Traffic | None = None) -> Iterator[TestClient]:
    app = create_gateway(router, ADMIN, None, timeout_s=60, traffic=traffic)
    with TestClient(app) as client:
        yield client


def metric(client: TestClient, name: str, **labels: str) -> float:
    return sample(client.get("/metrics").text, name, **labels)


# -- customer buckets ------------------------------------------------------------------------


def test_the_base_model_has_its_own_bucket() -> None:
    assert customer_bucket("base") == "base"


def test_a_customers_bucket_is_the_same_in_every_process() -> None:
    # Literal values: hash() would give others in another process (PYTHONHASHSEED).
    assert [customer_bucket(name) for name in ("acme", "globex", "initech")] == [
        "c01",
        "c10",
        "c00",
    ]


def test_thousands_of_customers_share_sixteen_buckets() -> None:
    buckets = {customer_bucket(f"customer-{index}") for index in range(5000)}
    assert buckets == {f"c{index:02d}" for index in range(CUSTOMER_BUCKETS)}


@pytest.mark.integration
def test_requests_are_counted_by_customer_bucket() -> None:
    with FakeReplica(answer(200, COMPLETION)) as replica:
        router = SpyRouter({"acme": [replica.url], "globex": [replica.url], "base": [replica.url]})
        with gateway(router) as client:
            for model in ("acme", "acme", "globex", "base"):
                assert client.post("/v1/completions", json={**ASK, "model": model}).is_success
            counts = {
                bucket: metric(
                    client,
                    "lora_ops_gateway_requests_total",
                    replica=replica.url,
                    bucket=bucket,
                    outcome="ok",
                )
                for bucket in ("c01", "c10", "base")
            }
    assert counts == {"c01": 2, "c10": 1, "base": 1}


# -- cold routes -----------------------------------------------------------------------------


@pytest.mark.integration
def test_answers_that_said_cold_are_counted_by_replica() -> None:
    with (
        FakeReplica(answer(200, COMPLETION, COLD)) as cold,
        FakeReplica(answer(200, COMPLETION, RESIDENT)) as warm,
        FakeReplica(stream(EVENTS, headers=COLD)) as cold_stream,
    ):
        router = SpyRouter({"acme": [cold.url], "globex": [warm.url], "initech": [cold_stream.url]})
        with gateway(router) as client:
            first = client.post("/v1/completions", json=ASK)
            client.post("/v1/completions", json=ASK)
            warmed = client.post("/v1/completions", json={**ASK, "model": "globex"})
            streamed = client.post(
                "/v1/completions", json={**ASK, "model": "initech", "stream": True}
            )
            counts = [
                metric(client, "lora_ops_gateway_cold_routes_total", replica=url)
                for url in (cold.url, warm.url, cold_stream.url)
            ]
    assert counts == [2, 0, 1]
    assert first.headers["x-lora-ops-adapter"] == "cold"  # passed on: why it was slow
    assert warmed.headers["x-lora-ops-adapter"] == "resident"
    assert streamed.headers["x-lora-ops-adapter"] == "cold"
    assert streamed.content == b"".join(EVENTS)


@pytest.mark.integration
def test_a_replica_without_the_header_is_never_counted_cold() -> None:
    with (
        FakeReplica(answer(200, COMPLETION)) as vllm_like,
        gateway(SpyRouter({"acme": [vllm_like.url]})) as client,
    ):
        reply = client.post("/v1/completions", json=ASK)
        text = client.get("/metrics").text
    assert "x-lora-ops-adapter" not in reply.headers
    assert "lora_ops_gateway_cold_routes_total{" not in text  # not even a zero series


# -- traffic ---------------------------------------------------------------------------------


def test_traffic_counts_per_model_and_starts_again_after_a_take() -> None:
    traffic = Traffic()
    for model in ("acme", "globex", "acme"):
        traffic.record(model)
    assert traffic.take() == {"acme": 2, "globex": 1}
    assert traffic.take() == {}
    traffic.record("globex")
    assert traffic.take() == {"globex": 1}


def test_traffic_loses_no_request_recorded_from_many_threads() -> None:
    traffic = Traffic()
    taken: list[dict[str, int]] = []
    start = threading.Barrier(5)

    def record(model: str) -> None:
        start.wait()
        for _ in range(2000):
            traffic.record(model)

    def take() -> None:
        start.wait()
        for _ in range(200):
            taken.append(traffic.take())

    threads = [threading.Thread(target=record, args=(m,)) for m in ("a", "b", "a", "c")]
    threads.append(threading.Thread(target=take))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken.append(traffic.take())
    totals = {model: sum(counts.get(model, 0) for counts in taken) for model in "abc"}
    assert totals == {"a": 4000, "b": 2000, "c": 2000}


def test_the_gateway_keeps_the_traffic_it_was_given_or_a_fresh_one() -> None:
    traffic = Traffic()
    given = create_gateway(SpyRouter({}), ADMIN, None, traffic=traffic)
    assert gateway_of(given).traffic is traffic
    fresh = create_gateway(SpyRouter({}), ADMIN, None)
    assert isinstance(gateway_of(fresh).traffic, Traffic)
    assert gateway_of(fresh).traffic is not traffic


@pytest.mark.integration
@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_a_retried_request_is_recorded_once(streamed: bool) -> None:
    traffic = Traffic()
    script = stream(EVENTS) if streamed else answer(200, COMPLETION)
    with (
        FakeReplica(drop) as dead,
        FakeReplica(script) as well,
        gateway(SpyRouter({"acme": [dead.url, well.url]}), traffic) as client,
    ):
        reply = client.post("/v1/completions", json={**ASK, "stream": streamed})
        assert metric(client, "lora_ops_gateway_retries_total") == 1
    assert reply.status_code == 200
    assert traffic.take() == {"acme": 1}


@pytest.mark.integration
def test_traffic_holds_demand_for_served_models_only() -> None:
    traffic = Traffic()
    dead = [f"http://127.0.0.1:{port}" for port in free_ports(2)]  # nothing listens there
    with gateway(SpyRouter({"acme": dead}), traffic) as client:
        assert client.post("/v1/completions", json=ASK).status_code == 503  # both tried
        assert client.post("/v1/completions", json=ASK).status_code == 503  # both cooling
        assert client.post("/v1/completions", json={**ASK, "model": "nobody"}).status_code == 404
        assert client.post("/v1/completions", content=b"not json").status_code == 400
    assert traffic.take() == {"acme": 2}
