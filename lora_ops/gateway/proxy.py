"""Forwarding to replicas: one shared HTTP client, one retry elsewhere, answers unchanged.

A request goes to the router's first candidate. A replica that cannot be reached, times out
or answers 5xx before anything was relayed is reported and the next candidate tried, once:
a second retry would mostly double the load on a fleet already in trouble. A 4xx is the
caller's answer and comes back as it is. Past the first relayed byte nothing is retried; a
stream that breaks then ends with an error event (:mod:`~lora_ops.gateway.relay`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from fastapi.responses import Response

from lora_ops.gateway.errors import unavailable, unknown_model
from lora_ops.gateway.load import Load
from lora_ops.gateway.metrics import GatewayMetrics
from lora_ops.gateway.relay import EmptyStream, Relay, kept_headers
from lora_ops.gateway.routing import Router
from lora_ops.gateway.timing import Timing, timed

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # the first candidate and one retry
# A replica that takes seconds to accept a connection is gone or drowning: fail over soon
# rather than after the whole request timeout.
CONNECT_TIMEOUT_S = 5.0
FAILURES = (httpx.HTTPError, httpx.InvalidURL, EmptyStream)


@dataclass(frozen=True)
class Failure:
    """An attempt that may be retried elsewhere: nothing of it reached the caller."""

    reason: str


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Proxy:
    """Sends a request to a replica the router chooses and relays what comes back.

    Args:
        router: chooses candidates and hears every outcome.
        load: in-flight counts, kept here, read by the router.
        metrics: the gateway's counters.
        admin_token: the fleet's admin token, the gateway's credential at every replica.
        timeout_s: the longest wait for a replica's next byte.
    """

    def __init__(
        self,
        router: Router,
        load: Load,
        metrics: GatewayMetrics,
        admin_token: str | None,
        timeout_s: float,
    ) -> None:
        self.router = router
        self.load = load
        self.metrics = metrics
        self.headers = {"content-type": "application/json"}
        if admin_token:
            self.headers["authorization"] = f"Bearer {admin_token}"
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        self.client: httpx.AsyncClient | None = None

    def open(self) -> httpx.AsyncClient:
        """The shared client; the app's lifespan opens it on start and closes it on stop."""
        # httpx's default of 100 connections would queue a busy gateway's streams.
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        return self.client

    def _http(self) -> httpx.AsyncClient:
        if self.client is None:
            raise RuntimeError("the gateway's HTTP client is opened by the app's lifespan")
        return self.client

    async def forward(
        self, path: str, body: bytes, model: str, stream: bool, timing: Timing
    ) -> Response:
        """The answer to ``body`` (already read, holding ``model``) from the first candidate
        that gives one, or a 404/503 of the gateway's own."""
        urls = self.router.candidates(model)[:MAX_ATTEMPTS]
        if not urls:
            return self._nowhere(model)
        timing.forwarded = True
        failure = Failure("")
        for attempt, url in enumerate(urls):
            if attempt:
                self.metrics.retries.inc()
                log.warning("%s failed (%s); retrying on %s", urls[0], failure.reason, url)
            send = self._send_streamed if stream else self._send_buffered
            answer = await send(url, path, body, timing)
            if isinstance(answer, Response):
                if attempt:
                    self.metrics.failovers.inc()
                return answer
            failure = answer
            self.settle(url, "failed", answer.reason)
        self.metrics.unavailable.inc()
        return unavailable(f"no replica could answer for the model {model!r}; try again")

    def _nowhere(self, model: str) -> Response:
        # A model the fleet does not serve is the caller's mistake, a 404: OpenAI's clients
        # retry a 503 by themselves, which for a misspelt model would only repeat it.
        if model not in self.router.models():
            return unknown_model(model)
        self.metrics.unavailable.inc()
        return unavailable(f"no replica can serve the model {model!r} now; try again")

    def settle(self, url: str, outcome: str, reason: str = "") -> None:
        """Count an attempt's outcome and tell the router how the replica did."""
        self.metrics.requests.labels(url, outcome).inc()
        if outcome == "broken":
            self.metrics.broken_streams.inc()
        if outcome in ("failed", "broken"):
            self.router.report(url, False, reason)
        elif outcome in ("ok", "client_error"):
            self.router.report(url, True, reason)

    def _answered(self, url: str, status: int) -> None:
        if status < 400:
            self.settle(url, "ok")
        else:
            self.settle(url, "client_error", f"answered {status}")

    async def _send_buffered(
        self, url: str, path: str, body: bytes, timing: Timing
    ) -> Response | Failure:
        self.load.begin(url)
        try:
            reply = await timed(
                self._http().post(url + path, content=body, headers=self.headers), timing
            )
        except FAILURES as exc:
            return Failure(describe(exc))
        finally:
            self.load.end(url)
        if reply.status_code >= 500:
            return Failure(f"answered {reply.status_code}")
        self._answered(url, reply.status_code)
        return Response(reply.content, reply.status_code, headers=kept_headers(reply.headers))

    async def _send_streamed(
        self, url: str, path: str, body: bytes, timing: Timing
    ) -> Response | Failure:
        http = self._http()
        request = http.build_request("POST", url + path, content=body, headers=self.headers)
        self.load.begin(url)
        reply: httpx.Response | None = None
        relayed = False  # once the relay holds the connection, it closes it
        try:
            reply = await timed(http.send(request, stream=True), timing)
            if reply.status_code >= 500:
                return Failure(f"answered {reply.status_code}")
            if reply.status_code != 200:  # a refusal: short, and the caller's answer
                content = await timed(reply.aread(), timing)
                self._answered(url, reply.status_code)
                return Response(content, reply.status_code, headers=kept_headers(reply.headers))
            relay = Relay(url, reply, timing, self.settle, lambda: self.load.end(url))
            first = await relay.first_event()
            relayed = True
            return relay.response(first)
        except FAILURES as exc:
            return Failure(describe(exc))
        finally:
            if not relayed:
                if reply is not None:
                    await reply.aclose()
                self.load.end(url)
