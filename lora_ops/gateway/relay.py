"""A replica's server-sent events on their way to the caller, whole events as they arrive.

Events are cut at their blank line, so a stream that breaks mid-event leaves no half event
at the caller, and the error event that ends it parses. Nothing waits for more than the
event in hand: the caller sees each token when the replica sends it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping

import httpx
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lora_ops.gateway.errors import error_event
from lora_ops.gateway.metrics import ADAPTER_HEADER
from lora_ops.gateway.timing import Timing, timed_chunks

log = logging.getLogger(__name__)
Settle = Callable[[str, str, str], None]  # (url, outcome, reason): metrics and the router
# What a replica's answer keeps on the way back; whether the adapter was resident tells a
# caller why an answer was slow, and nothing a timing would not.
KEPT_HEADERS = ("content-type", "retry-after", ADAPTER_HEADER)
BROKEN = "the replica's stream broke off before the answer was complete"


class EmptyStream(Exception):
    """A replica answered 200 and closed without sending an event."""


def kept_headers(headers: httpx.Headers) -> dict[str, str]:
    return {name: headers[name] for name in KEPT_HEADERS if name in headers}


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """Every complete event in ``chunks`` as soon as its blank line has arrived (several at
    once when they came together); what is left when the stream ends cleanly, as is."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        cut = _end_of_last_event(pending)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _end_of_last_event(data: bytes) -> int:
    """Where the last complete event in ``data`` ends; 0 when there is none yet."""
    ends = [data.rfind(blank) + len(blank) for blank in (b"\n\n", b"\r\n\r\n") if blank in data]
    return max(ends, default=0)


class EventStream(StreamingResponse):
    """A streaming response that runs ``finish`` however it ended.

    A generator's own ``finally`` never runs when the caller leaves before its first step,
    which would leave the replica's connection open and its request counted in flight.
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        finish: Callable[[], Awaitable[None]],
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(events, headers=headers)
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._finish()


class Relay:
    """One replica's 200 event stream, from its first event to its end or break.

    Args:
        url: the replica.
        reply: its open streamed response.
        timing: the request's clock; waits on the replica are added to it.
        settle: called once with the outcome: ok, broken (after the first event), or
            abandoned (the caller went away).
        release: called once when the replica's connection is closed.
    """

    def __init__(
        self,
        url: str,
        reply: httpx.Response,
        timing: Timing,
        settle: Settle,
        release: Callable[[], None],
    ) -> None:
        self.url = url
        self.reply = reply
        self.events = sse_events(timed_chunks(reply.aiter_bytes(), timing))
        self._settle = settle
        self._release = release
        self.relayed: AsyncGenerator[bytes, None] | None = None
        self.settled = False

    async def first_event(self) -> bytes:
        """The first event, read before the caller gets a status line, so a replica that
        fails now is still a failover and not a broken stream.

        Raises:
            httpx.HTTPError: the replica failed or timed out.
            EmptyStream: it closed without an event.
        """
        try:
            return await anext(self.events)
        except StopAsyncIteration:
            raise EmptyStream("the stream ended before its first event") from None

    def response(self, first: bytes) -> EventStream:
        self.relayed = self._relayed(first)
        return EventStream(self.relayed, self.close, kept_headers(self.reply.headers))

    async def _relayed(self, first: bytes) -> AsyncGenerator[bytes, None]:
        yield first
        try:
            async for event in self.events:
                yield event
        except httpx.HTTPError as exc:
            # The status line is long gone: the caller learns of the failure from a last
            # event in OpenAI's error shape, then the stream ends.
            self.settle("broken", f"{type(exc).__name__}: {exc}")
            yield error_event(BROKEN)
            return
        self.settle("ok", "")

    def settle(self, outcome: str, reason: str) -> None:
        if not self.settled:
            self.settled = True
            self._settle(self.url, outcome, reason)

    async def close(self) -> None:
        """Close the replica's side, whatever happened to the caller's."""
        try:
            # A caller that left mid-stream leaves both generators suspended, not closed.
            if self.relayed is not None:
                await self.relayed.aclose()
            await self.events.aclose()
            await self.reply.aclose()
        finally:
            self.settle("abandoned", "the caller went away")
            self._release()
