"""The static router's rotation, the in-flight counts and the event framing, on their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lora_ops.gateway import ANY_MODEL, Load, StaticRouter
from lora_ops.gateway.relay import sse_events

A, B, C = "http://a:1", "http://b:2", "http://c:3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_candidates_follow_placement_and_unknown_models_have_none() -> None:
    router = StaticRouter({"acme": [A, B + "/"], "base": [C]})
    assert router.candidates("acme") == [A, B]
    assert router.candidates("globex") == []
    assert router.models() == ["acme", "base"]


def test_any_model_routes_what_is_not_named_but_is_not_listed() -> None:
    router = StaticRouter({"acme": [A], ANY_MODEL: [B, C]})
    assert router.candidates("acme") == [A]
    assert router.candidates("globex") == [B, C]
    assert router.models() == ["acme"]


def test_a_failure_takes_a_replica_out_for_the_cooldown_then_it_comes_back() -> None:
    clock = Clock()
    router = StaticRouter({"acme": [A, B]}, cooldown_s=30, clock=clock)
    router.report(A, False, "ConnectError")
    assert router.candidates("acme") == [B]
    clock.now += 29.9
    router.report(A, True)  # an answer begun before the failure does not end the cooldown
    assert router.candidates("acme") == [B]
    clock.now += 0.1
    assert router.candidates("acme") == [A, B]


def test_every_replica_cooling_leaves_no_candidate() -> None:
    clock = Clock()
    router = StaticRouter({"acme": [A, B]}, cooldown_s=5, clock=clock)
    router.report(A, False)
    router.report(B, False)
    assert router.candidates("acme") == []
    assert not router.in_rotation(A)


def test_placement_order_goes_first_until_a_replica_is_busier_than_the_margin() -> None:
    load = Load()
    router = StaticRouter({"acme": [A, B, C]}, load=load, spill_margin=2)
    assert router.candidates("acme") == [A, B, C]
    for _ in range(2):
        load.begin(A)
    assert router.candidates("acme") == [A, B, C]  # 2 above the least: still first
    load.begin(A)
    load.begin(B)
    assert router.candidates("acme") == [B, C, A]  # 3 above: A spills behind the rest
    for _ in range(3):
        load.end(A)
    assert load.inflight(A) == 0
    assert router.candidates("acme") == [A, B, C]


def test_a_margin_of_zero_is_least_loaded_first() -> None:
    load = Load()
    router = StaticRouter({"acme": [A, B, C]}, load=load, spill_margin=0)
    load.begin(A)
    load.begin(A)
    load.begin(B)
    assert router.candidates("acme") == [C, A, B]  # the busier ones keep placement order


def test_load_never_counts_below_zero() -> None:
    load = Load()
    load.end(A)
    assert load.inflight(A) == 0
    assert load.snapshot() == {A: 0}


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _events(parts: list[bytes]) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [event async for event in sse_events(_chunks(parts))]

    return asyncio.run(collect())


@pytest.mark.parametrize(
    ("parts", "events"),
    [
        pytest.param([b"data: 1\n\n"], [b"data: 1\n\n"], id="one-event"),
        pytest.param(
            [b"data: 1\n\nda", b"ta: 2\n\n"], [b"data: 1\n\n", b"data: 2\n\n"], id="split"
        ),
        pytest.param([b"data: 1\n\ndata: 2\n\n"], [b"data: 1\n\ndata: 2\n\n"], id="together"),
        pytest.param([b"data: 1\r\n\r\n"], [b"data: 1\r\n\r\n"], id="crlf"),
        pytest.param([b"da", b"ta: 1", b"\n\n"], [b"data: 1\n\n"], id="in-pieces"),
        pytest.param([b'{"not": "events"}'], [b'{"not": "events"}'], id="rest-at-end"),
    ],
)
def test_events_are_cut_at_their_blank_line(parts: list[bytes], events: list[bytes]) -> None:
    assert _events(parts) == events
