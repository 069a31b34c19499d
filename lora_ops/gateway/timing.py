"""The gateway's own time: a request's total minus the time spent awaiting replicas.

Time to a replica's first byte is the replica's (queueing, prefill), not the gateway's, so
every await on a replica is clocked apart and the rest is what the gateway added: reading
and checking the body, choosing a replica, copying the answer back to the caller.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


@dataclass
class Timing:
    """One request's clock; the middleware keeps it in ``request.state.timing``."""

    started: float
    upstream_s: float = 0.0  # every await on a replica, failed attempts included
    forwarded: bool = False  # only forwarded requests are observed


async def timed(awaitable: Awaitable[T], timing: Timing) -> T:
    """Await a replica, adding the wait to ``timing.upstream_s``."""
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        timing.upstream_s += time.perf_counter() - started


async def timed_chunks(chunks: AsyncIterator[bytes], timing: Timing) -> AsyncIterator[bytes]:
    """``chunks``, each wait for the next one added to ``timing.upstream_s``."""
    while True:
        started = time.perf_counter()
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        finally:
            timing.upstream_s += time.perf_counter() - started
        yield chunk


class OverheadClock:
    """ASGI middleware: starts each request's :class:`Timing`, and observes the gateway's own
    time once the last byte of a forwarded answer has been handed to the server."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = Timing(time.perf_counter())
        scope.setdefault("state", {})["timing"] = timing

        async def clocked(message: Message) -> None:
            await send(message)
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and timing.forwarded:
                spent = time.perf_counter() - timing.started - timing.upstream_s
                self.histogram.observe(max(0.0, spent))

        await self.app(scope, receive, clocked)
