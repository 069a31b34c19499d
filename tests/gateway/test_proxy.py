"""The gateway against scripted replicas: door checks, failover, refusals, broken streams.

Every replica here is a :class:`~tests.gateway.fakes.FakeReplica` that does one thing on
cue, so each outcome is certain and nothing waits on a clock.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lora_ops.gateway import Load, create_gateway
from tests.gateway.fakes import (
    DONE,
    FakeReplica,
    Received,
    SpyRouter,
    answer,
    completion_event,
    drop,
    sample,
    served,
    stream,
)
from tests.servers import free_ports

pytestmark = pytest.mark.integration  # scripted replicas, and some gateways, on 127.0.0.1

ADMIN = "gateway-admin-token-for-tests"
COMPLETION = {"object": "text_completion", "choices": [{"index": 0, "text": "hi"}]}
ASK = {"model": "acme", "prompt": "Hello", "max_tokens": 2}
ASK_STREAM = {**ASK, "stream": True}


@contextmanager
def gateway(router: SpyRouter, load: Load | None = None) -> Iterator[TestClient]:
    app = create_gateway(router, ADMIN, None, timeout_s=60, load=load)
    with TestClient(app) as client:
        yield client


def metric(client: TestClient, name: str, **labels: str) -> float:
    return sample(client.get("/metrics").text, name, **labels)


def events_of(text: str) -> list[str]:
    return [event for event in text.split("\n\n") if event]


def test_health_answers_and_metrics_are_prometheus_text() -> None:
    with gateway(SpyRouter({})) as client:
        assert client.get("/health").json() == {"status": "ok"}
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "lora_ops_gateway_retries_total 0.0" in metrics.text


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        pytest.param(b"not json", None, "not valid JSON", id="not-json"),
        pytest.param(b"[1, 2]", "body", "JSON object", id="not-an-object"),
        pytest.param(b'{"prompt": "x"}', "model", "model name", id="no-model"),
        pytest.param(b'{"model": 3}', "model", "model name", id="model-not-a-string"),
    ],
)
def test_a_body_without_a_model_is_refused_at_the_door(
    body: bytes, param: str | None, words: str
) -> None:
    with FakeReplica(answer(200, COMPLETION)) as replica:
        with gateway(SpyRouter({"acme": [replica.url]})) as client:
            reply = client.post("/v1/completions", content=body)
        assert replica.received == []
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words in error["message"]


def test_a_model_the_fleet_does_not_serve_is_not_found() -> None:
    with gateway(SpyRouter({"acme": ["http://127.0.0.1:1"]})) as client:
        reply = client.post("/v1/completions", json={**ASK, "model": "nobody"})
        assert metric(client, "lora_ops_gateway_unavailable_total") == 0
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_no_replica_reachable_is_a_503_with_retry_after() -> None:
    dead = [f"http://127.0.0.1:{port}" for port in free_ports(2)]  # nothing listens there
    router = SpyRouter({"acme": dead})
    with gateway(router) as client:
        first = client.post("/v1/completions", json=ASK)
        assert router.failures() == dead
        again = client.post("/v1/completions", json=ASK)  # both cooling: not even tried
        assert router.failures() == dead
        assert metric(client, "lora_ops_gateway_retries_total") == 1
        assert metric(client, "lora_ops_gateway_unavailable_total") == 2
    for reply in (first, again):
        assert reply.status_code == 503
        assert int(reply.headers["retry-after"]) > 0
        assert reply.json()["error"]["type"] == "service_unavailable"


def test_a_5xx_is_retried_once_on_the_next_replica() -> None:
    with (
        FakeReplica(answer(503, {"error": {"message": "shutting down"}})) as sick,
        FakeReplica(answer(200, COMPLETION)) as well,
    ):
        router = SpyRouter({"acme": [sick.url, well.url]})
        with gateway(router) as client:
            reply = client.post("/v1/completions", json=ASK)
            assert metric(client, "lora_ops_gateway_retries_total") == 1
            assert metric(client, "lora_ops_gateway_failovers_total") == 1
            requests = "lora_ops_gateway_requests_total"
            failed = metric(client, requests, replica=sick.url, bucket="c01", outcome="failed")
            ok = metric(client, requests, replica=well.url, bucket="c01", outcome="ok")
    assert (reply.status_code, reply.json()) == (200, COMPLETION)
    assert [(url, ok) for url, ok, _ in router.reports] == [(sick.url, False), (well.url, True)]
    assert (failed, ok) == (1, 1)


def test_there_is_one_retry_at_most() -> None:
    with FakeReplica(drop) as a, FakeReplica(drop) as b, FakeReplica(answer(200, COMPLETION)) as c:
        with gateway(SpyRouter({"acme": [a.url, b.url, c.url]})) as client:
            reply = client.post("/v1/completions", json=ASK)
        assert c.received == []
    assert reply.status_code == 503


def test_a_4xx_is_the_callers_answer_and_is_not_retried() -> None:
    refusal = {"error": {"message": "queue full", "type": "rate_limit_exceeded"}}
    with (
        FakeReplica(answer(429, refusal, {"Retry-After": "7", "X-Internal": "no"})) as busy,
        FakeReplica(answer(200, COMPLETION)) as other,
    ):
        router = SpyRouter({"acme": [busy.url, other.url]})
        with gateway(router) as client:
            reply = client.post("/v1/completions", json=ASK)
            streamed = client.post("/v1/completions", json=ASK_STREAM)
            assert metric(client, "lora_ops_gateway_retries_total") == 0
        assert other.received == []
    for answered in (reply, streamed):
        assert (answered.status_code, answered.json()) == (429, refusal)
        assert answered.headers["retry-after"] == "7"
        assert "x-internal" not in answered.headers
    assert router.reports == [(busy.url, True, "answered 429")] * 2


NOT_HELD = {"error": {"message": "the model 'acme' does not exist", "code": "model_not_found"}}


@pytest.mark.parametrize("body", [ASK, ASK_STREAM], ids=["buffered", "streamed"])
def test_a_replica_that_no_longer_holds_the_model_passes_it_on(body: dict[str, object]) -> None:
    # Placement moved after the router's last read: the old replica unloaded the adapter.
    with (
        FakeReplica(answer(404, NOT_HELD)) as old,
        FakeReplica(answer(200, COMPLETION)) as new,
    ):
        router = SpyRouter({"acme": [old.url, new.url]})
        with gateway(router) as client:
            reply = client.post("/v1/completions", json=body)
            requests = "lora_ops_gateway_requests_total"
            moved = metric(client, requests, replica=old.url, bucket="c01", outcome="misplaced")
        assert len(new.received) == 1
    assert (reply.status_code, moved) == (200, 1)
    assert router.failures() == []  # not the replica's fault: it stays in rotation


def test_when_no_replica_holds_the_model_the_replicas_404_is_the_answer() -> None:
    with (
        FakeReplica(answer(404, NOT_HELD)) as a,
        FakeReplica(answer(404, NOT_HELD)) as b,
        gateway(SpyRouter({"acme": [a.url, b.url]})) as client,
    ):
        reply = client.post("/v1/completions", json=ASK)
        assert metric(client, "lora_ops_gateway_unavailable_total") == 0
    assert (reply.status_code, reply.json()) == (404, NOT_HELD)


def test_the_body_goes_on_unchanged_with_the_admin_token_not_the_callers_key() -> None:
    body = b'{"model": "acme",   "prompt": "Hi", "max_tokens": 2, "extra": [1, 2]}'
    load = Load()
    seen: list[int] = []

    def script(conn: object, request: object) -> None:
        seen.append(load.inflight(replica.url))
        answer(200, COMPLETION)(conn, request)  # type: ignore[arg-type]

    with FakeReplica(script) as replica:
        with gateway(SpyRouter({"acme": [replica.url]}), load) as client:
            headers = {"Authorization": f"Bearer {ADMIN}", "X-Caller": "secret"}
            assert client.post("/v1/completions", content=body, headers=headers).status_code == 200
        received = replica.received[0]
    assert received.body == body
    assert received.header("authorization") == f"Bearer {ADMIN}"
    assert received.header("x-caller") is None
    assert received.head.startswith("POST /v1/completions ")
    assert (seen, load.inflight(replica.url)) == ([1], 0)


def test_a_stream_broken_midway_ends_with_one_error_event() -> None:
    first = completion_event("Hel")
    load = Load()
    with (
        FakeReplica(stream([first], end=False)) as dying,
        FakeReplica(stream([completion_event("x"), DONE])) as spare,
    ):
        router = SpyRouter({"acme": [dying.url, spare.url]})
        with gateway(router, load) as client:
            reply = client.post("/v1/completions", json=ASK_STREAM)
            assert metric(client, "lora_ops_gateway_broken_streams_total") == 1
            assert metric(client, "lora_ops_gateway_retries_total") == 0
        assert spare.received == []  # bytes reached the caller: no retry
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = events_of(reply.text)
    assert events[0] + "\n\n" == first.decode()
    assert len(events) == 2
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"
    assert router.failures() == [dying.url]
    assert load.inflight(dying.url) == 0


@pytest.mark.parametrize(
    "failing",
    [pytest.param(drop, id="no-response"), pytest.param(stream([], end=False), id="no-event")],
)
def test_a_stream_that_fails_before_its_first_event_fails_over(failing: object) -> None:
    events = [completion_event("Hi"), completion_event("!", "stop"), DONE]
    with FakeReplica(failing) as a, FakeReplica(stream(events)) as b:  # type: ignore[arg-type]
        router = SpyRouter({"acme": [a.url, b.url]})
        with gateway(router) as client:
            reply = client.post("/v1/completions", json=ASK_STREAM)
            assert metric(client, "lora_ops_gateway_failovers_total") == 1
    assert reply.content == b"".join(events)
    assert [(url, ok) for url, ok, _ in router.reports] == [(a.url, False), (b.url, True)]


def test_each_event_reaches_the_caller_before_the_next_is_sent() -> None:
    go = threading.Event()
    events = [completion_event("Hel"), completion_event("lo", "stop"), DONE]
    with FakeReplica(stream(events, go=go)) as replica:
        app = create_gateway(SpyRouter({"acme": [replica.url]}), ADMIN, None, 60)
        with (
            served(app) as url,
            httpx.stream("POST", url + "/v1/completions", json=ASK_STREAM, timeout=60) as reply,
        ):
            chunks = reply.iter_raw()
            received = b""
            while not received.endswith(b"\n\n"):
                received += next(chunks)  # the replica holds the rest until this arrives
            assert received == events[0]
            go.set()
            received += b"".join(chunks)
    assert received == b"".join(events)


def test_the_openai_client_raises_on_a_broken_stream() -> None:
    with FakeReplica(stream([completion_event("Hel")], end=False)) as replica:
        app = create_gateway(SpyRouter({"acme": [replica.url]}), ADMIN, None, 60)
        with served(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0)
            chunks = client.completions.create(model="acme", prompt="Hi", stream=True)
            assert next(chunks).choices[0].text == "Hel"
            with pytest.raises(openai.APIError, match="broke off"):
                next(chunks)


def test_the_gateways_own_time_is_observed_for_forwarded_requests_only() -> None:
    with (
        FakeReplica(answer(200, COMPLETION)) as replica,
        gateway(SpyRouter({"acme": [replica.url]})) as client,
    ):
        client.get("/health")
        client.post("/v1/completions", content=b"not json")
        assert metric(client, "lora_ops_gateway_overhead_seconds_count") == 0
        client.post("/v1/completions", json=ASK)
        client.post("/v1/chat/completions", json=ASK)
        assert metric(client, "lora_ops_gateway_overhead_seconds_count") == 2
        assert metric(client, "lora_ops_gateway_overhead_seconds_sum") >= 0


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "mid-stream"])
def test_a_caller_that_goes_away_frees_the_replica(streamed: bool) -> None:
    asked, freed = threading.Event(), threading.Event()
    first = completion_event("Hel")

    def script(conn: socket.socket, _: Received) -> None:
        if streamed:
            stream([first], end=False)(conn, _)
        asked.set()
        conn.settimeout(120)
        if conn.recv(1) == b"":  # the gateway closed its side: the replica can drop the work
            freed.set()

    body = json.dumps(ASK_STREAM if streamed else ASK).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json"
    request += b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    with FakeReplica(script) as replica:
        app = create_gateway(SpyRouter({"acme": [replica.url]}), ADMIN, None, 60)
        with served(app) as url:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as caller:
                caller.sendall(request)
                assert asked.wait(timeout=120)
                seen = b""
                while streamed and first not in seen:  # the event is relayed, then we leave
                    seen += caller.recv(65536)
            assert freed.wait(timeout=120)
