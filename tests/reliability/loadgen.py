"""A bounded load generator for a replica on loopback: chat requests across adapters.

It always stops by itself: after ``total`` requests, after ``duration_s`` of starting new
ones (a soak), or at ``deadline_s`` whatever is still in flight (those count as errors).
At most ``concurrency`` requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class LoadPlan:
    """What to send, how much, and for how long at most."""

    url: str
    models: Sequence[str]  # request i names models[i % len(models)]
    total: int
    concurrency: int
    deadline_s: float
    duration_s: float | None = None  # stop starting requests after this long
    max_tokens: int = 8
    timeout_s: float = 60.0  # one request

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://127.", "http://localhost")):
            raise ValueError(f"{self.url}: load is only ever sent to loopback")
        if min(self.total, self.concurrency) < 1 or self.deadline_s <= 0:
            raise ValueError("total and concurrency must be >= 1, deadline_s > 0")


@dataclass
class Outcome:
    model: str
    status: str  # the HTTP status, or the exception's name when there was no answer
    latency_s: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    elapsed_s: float
    unfinished: int  # still in flight at the deadline

    def statuses(self) -> Counter[str]:
        counts = Counter(o.status for o in self.outcomes)
        if self.unfinished:
            counts["deadline"] += self.unfinished
        return counts

    def errors(self) -> int:
        return sum(n for status, n in self.statuses().items() if status != "200")

    def latencies_ms(self, status: str = "200") -> list[float]:
        return sorted(o.latency_s * 1000 for o in self.outcomes if o.status == status)

    def summary(self) -> dict[str, Any]:
        """The figures a load test prints: counts, latency percentiles, throughput."""
        ok = self.latencies_ms()
        return {
            "requests": len(self.outcomes) + self.unfinished,
            "errors": self.errors(),
            "statuses": dict(self.statuses()),
            "p50_ms": round(percentile(ok, 50), 1),
            "p99_ms": round(percentile(ok, 99), 1),
            "throughput_rps": round(len(ok) / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when there are none)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def generate_load(plan: LoadPlan) -> LoadReport:
    """Run ``plan`` to its end and report every request's outcome."""
    return asyncio.run(_run(plan))


async def _run(plan: LoadPlan) -> LoadReport:
    outcomes: list[Outcome] = []
    issued = 0
    started = time.monotonic()

    def next_index() -> int | None:
        nonlocal issued
        over = plan.duration_s is not None and time.monotonic() - started >= plan.duration_s
        if issued >= plan.total or over:
            return None
        issued += 1
        return issued - 1

    limits = httpx.Limits(
        max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency
    )
    async with httpx.AsyncClient(
        base_url=plan.url, limits=limits, timeout=plan.timeout_s
    ) as client:
        workers = [
            asyncio.create_task(_worker(client, plan, next_index, outcomes))
            for _ in range(plan.concurrency)
        ]
        _, pending = await asyncio.wait(workers, timeout=plan.deadline_s)
        for worker in pending:
            worker.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return LoadReport(outcomes, time.monotonic() - started, unfinished=issued - len(outcomes))


async def _worker(
    client: httpx.AsyncClient,
    plan: LoadPlan,
    next_index: Any,
    outcomes: list[Outcome],
) -> None:
    while (index := next_index()) is not None:
        model = plan.models[index % len(plan.models)]
        outcomes.append(await _ask(client, plan, model, index))


async def _ask(client: httpx.AsyncClient, plan: LoadPlan, model: str, index: int) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Question {index}: what does the plan cost?"}],
        "max_tokens": plan.max_tokens,
        "temperature": 0,
    }
    started = time.monotonic()
    try:
        response = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return Outcome(model, type(exc).__name__, time.monotonic() - started)
    latency = time.monotonic() - started
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return Outcome(model, str(response.status_code), latency, dict(response.headers), payload)
