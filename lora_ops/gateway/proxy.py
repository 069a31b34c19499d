"""Forwarding to replicas: one shared HTTP client, one retry elsewhere, answers unchanged.

A request goes to the router's first candidate. A replica that cannot be reached, times out
or answers 5xx before anything was relayed is reported and the next candidate tried, once:
a second retry would mostly double the load on a fleet already in trouble. A 4xx is the
caller's answer and comes back as it is, but for a 404 saying the replica does not hold
the model: placement moved since the router last read it, so the next candidate is tried
(and the replica is not blamed). Past the first relayed byte nothing is retried; a
stream that breaks then ends with an error event (:mod:`~lora_ops.gateway.relay`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import httpx
from fastapi.responses import Response

from lora_ops.gateway.errors import unavailable, unknown_model
from lora_ops.gateway.load import Load
from lora_ops.gateway.metrics import ADAPTER_HEADER, GatewayMetrics, customer_bucket
from lora_ops.gateway.relay import EmptyStream, Relay, Settle, kept_headers
from lora_ops.gateway.routing import Router
from lora_ops.gateway.timing import Timing, timed
from lora_ops.gateway.traffic import Traffic

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # the first candidate and one retry
# A replica that takes seconds to accept a connection is gone or drowning: fail over soon
# rather than after the whole request timeout.
CONNECT_TIMEOUT_S = 5.0
FAILURES = (httpx.HTTPError, httpx.InvalidURL, EmptyStream)


@dataclass(frozen=True)
class Failure:
    """An attempt that may be retried elsewhere: nothing of it reached the caller.

    ``fallback`` is the replica's own answer when the replica is not at fault (it does not
    hold the model: placement moved after the router's last read), given to the caller if
    no other replica answers.
    """

    reason: str
    fallback: Response | None = None


def misplaced(status: int, content: bytes) -> bool:
    """A replica's 404 saying it does not hold the requested model."""
    if status != 404:
        return False
    try:
        return bool(json.loads(content)["error"]["code"] == "model_not_found")
    except (ValueError, KeyError, TypeError):
        return False


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
        traffic: hears each request for a model the fleet serves, once however many
            replicas are tried.
    """

    def __init__(
        self,
        router: Router,
        load: Load,
        metrics: GatewayMetrics,
        admin_token: str | None,
        timeout_s: float,
        traffic: Traffic,
    ) -> None:
        self.router = router
        self.load = load
        self.metrics = metrics
        self.traffic = traffic
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
        self.traffic.record(model)
        timing.forwarded = True
        bucket = customer_bucket(model)
        failure = Failure("")
        for attempt, url in enumerate(urls):
            if attempt:
                self.metrics.retries.inc()
                log.warning("%s failed (%s); retrying on %s", urls[0], failure.reason, url)
            send = self._send_streamed if stream else self._send_buffered
            answer = await send(url, path, body, timing, bucket)
            if isinstance(answer, Response):
                if attempt:
                    self.metrics.failovers.inc()
                return answer
            failure = answer
            outcome = "failed" if answer.fallback is None else "misplaced"
            self.settle(url, bucket, outcome, answer.reason)
        if failure.fallback is not None:
            return failure.fallback
        self.metrics.unavailable.inc()
        return unavailable(f"no replica could answer for the model {model!r}; try again")

    def _nowhere(self, model: str) -> Response:
        # A model the fleet does not serve is the caller's mistake, a 404: OpenAI's clients
        # retry a 503 by themselves, which for a misspelt model would only repeat it.
        if model not in self.router.models():
            return unknown_model(model)
        # Still demand: a customer whose replicas are all failing may need more of them.
        self.traffic.record(model)
        self.metrics.unavailable.inc()
        return unavailable(f"no replica can serve the model {model!r} now; try again")

    def settle(self, url: str, bucket: str, outcome: str, reason: str = "") -> None:
        """Count an attempt's outcome and tell the router how the replica did."""
        self.metrics.requests.labels(replica=url, bucket=bucket, outcome=outcome).inc()
        if outcome == "broken":
            self.metrics.broken_streams.inc()
        if outcome in ("failed", "broken"):
            self.router.report(url, False, reason)
        elif outcome in ("ok", "client_error"):
            self.router.report(url, True, reason)

    def _settler(self, bucket: str) -> Settle:
        """:meth:`settle` for a relay: it knows its replica, not the request's bucket."""
        return lambda url, outcome, reason: self.settle(url, bucket, outcome, reason)

    def _answered(self, url: str, bucket: str, status: int) -> None:
        if status < 400:
            self.settle(url, bucket, "ok")
        else:
            self.settle(url, bucket, "client_error", f"answered {status}")

    def _heard(self, url: str, headers: httpx.Headers) -> None:
        """Count a replica's answer that had to load its adapter first."""
        if headers.get(ADAPTER_HEADER) == "cold":
            self.metrics.cold_routes.labels(url).inc()

    async def _send_buffered(
        self, url: str, path: str, body: bytes, timing: Timing, bucket: str
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
        self._heard(url, reply.headers)
        if reply.status_code >= 500:
            return Failure(f"answered {reply.status_code}")
        answer = Response(reply.content, reply.status_code, headers=kept_headers(reply.headers))
        if misplaced(reply.status_code, reply.content):
            return Failure("does not hold the model", answer)
        self._answered(url, bucket, reply.status_code)
        return answer

    async def _send_streamed(
        self, url: str, path: str, body: bytes, timing: Timing, bucket: str
    ) -> Response | Failure:
        http = self._http()
        request = http.build_request("POST", url + path, content=body, headers=self.headers)
        self.load.begin(url)
        reply: httpx.Response | None = None
        relayed = False  # once the relay holds the connection, it closes it
        try:
            reply = await timed(http.send(request, stream=True), timing)
            self._heard(url, reply.headers)
            if reply.status_code >= 500:
                return Failure(f"answered {reply.status_code}")
            if reply.status_code != 200:  # a refusal: short, and the caller's answer
                content = await timed(reply.aread(), timing)
                refusal = Response(content, reply.status_code, headers=kept_headers(reply.headers))
                if misplaced(reply.status_code, content):
                    return Failure("does not hold the model", refusal)
                self._answered(url, bucket, reply.status_code)
                return refusal
            settle = self._settler(bucket)
            relay = Relay(url, reply, timing, settle, lambda: self.load.end(url))
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
