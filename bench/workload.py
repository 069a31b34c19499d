"""Serving workloads the engine benchmarks share: requests, their timings, and how they arrive.

A request's time to first token is when the engine hands its first text piece to the
callback; its end-to-end latency is when its future resolves. Both engines under test (the
continuous-batching engine and the frozen window engine) take ``submit(prompt_ids, model,
params, on_text)`` and return a future, so one driver measures either.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common import percentile

from lora_ops.generation import GenerationResult, SamplingParams, TokenCallback

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "acme-support.jsonl"


class Submits(Protocol):
    def submit(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None = None,
        on_text: TokenCallback | None = None,
    ) -> Future[GenerationResult]: ...


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    model: str
    max_tokens: int


@dataclass
class Timing:
    """One request's clock: submitted, first text piece, done (perf_counter seconds)."""

    submitted: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.submitted

    @property
    def e2e(self) -> float:
        assert self.done is not None
        return self.done - self.submitted


@dataclass
class Run:
    """What a driver saw: every request's timing, and the wall time of the whole run."""

    timings: list[Timing] = field(default_factory=list)
    seconds: float = 0.0
    started: float = 0.0  # perf_counter when the run began
    # A closed loop's last request was sent then: until that moment every client had a
    # request in flight (the run was saturated); after it, the engine drains.
    saturated_until: float | None = None

    def steady_tokens_per_second(self) -> float:
        """Tokens per second while saturated: each request's tokens spread evenly from its
        first to its last, counted up to ``saturated_until`` (the drain left out)."""
        assert self.saturated_until is not None
        until = self.saturated_until
        tokens = 0.0
        for timing in self.timings:
            assert timing.first is not None
            assert timing.done is not None
            if timing.done <= until:
                tokens += timing.tokens
            elif timing.first < until:
                share = (until - timing.first) / (timing.done - timing.first)
                tokens += timing.tokens * share
        return tokens / (until - self.started)

    def figures(self, ttft_slo_s: float | None = None) -> dict[str, float]:
        """Throughput and latency percentiles; with ``ttft_slo_s``, the share that met it."""
        tokens = sum(t.tokens for t in self.timings)
        ttft = [t.ttft for t in self.timings]
        e2e = [t.e2e for t in self.timings]
        attained: dict[str, float] = {}
        if ttft_slo_s is not None:
            met = sum(1 for value in ttft if value <= ttft_slo_s)
            attained = {"ttft_slo_s": ttft_slo_s, "slo_attainment": round(met / len(ttft), 3)}
        if self.saturated_until is not None:
            attained["saturated_seconds"] = round(self.saturated_until - self.started, 2)
            attained["steady_tokens_per_second"] = round(self.steady_tokens_per_second(), 1)
        return {
            "requests": len(self.timings),
            "seconds": round(self.seconds, 2),
            "requests_per_second": round(len(self.timings) / self.seconds, 3),
            "tokens_per_second": round(tokens / self.seconds, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 3),
            "ttft_p99_s": round(percentile(ttft, 99), 3),
            "e2e_p50_s": round(percentile(e2e, 50), 3),
            "e2e_p99_s": round(percentile(e2e, 99), 3),
            **attained,
        }


def submit_timed(engine: Submits, request: Request, timing: Timing) -> Future[GenerationResult]:
    """Submit ``request``, stamping ``timing`` at its first piece and when it is done."""

    def on_text(_: int, __: str) -> None:
        if timing.first is None:
            timing.first = time.perf_counter()

    params = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
    timing.submitted = time.perf_counter()
    future = engine.submit(request.prompt_ids, request.model, params, on_text=on_text)

    def finished(done: Future[GenerationResult]) -> None:
        timing.done = time.perf_counter()
        if timing.first is None:
            timing.first = timing.done
        if done.exception() is None:
            timing.tokens = len(done.result().token_ids)

    future.add_done_callback(finished)
    return future


def closed_loop(engine: Submits, requests: Sequence[Request], clients: int) -> Run:
    """``clients`` callers, each sending its next request when the last one answered."""
    run = Run()
    pending = list(reversed(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                request = pending.pop()
                if not pending:
                    run.saturated_until = time.perf_counter()
                timing = Timing(0.0)
                run.timings.append(timing)
            submit_timed(engine, request, timing).result()

    started = run.started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - started
    return run


def open_loop(engine: Submits, requests: Sequence[Request], rate: float, seed: int) -> Run:
    """Requests sent at Poisson arrivals of ``rate`` per second, whatever the answers do."""
    gaps = random.Random(seed)
    run = Run()
    futures = []
    started = time.perf_counter()
    due = started
    for request in requests:
        due += gaps.expovariate(rate)
        time.sleep(max(0.0, due - time.perf_counter()))
        timing = Timing(0.0)
        run.timings.append(timing)
        futures.append(submit_timed(engine, request, timing))
    for future in futures:
        future.result()
    run.seconds = time.perf_counter() - started
    return run


def sample_messages() -> list[list[dict[str, str]]]:
    """The system and user turns of every example in the sample data."""
    lines = SAMPLE.read_text().splitlines()
    return [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"] for line in lines]


def zipf_models(names: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` picks from ``names`` with power-law popularity (weight 1/rank)."""
    weights = [1.0 / (rank + 1) for rank in range(len(names))]
    return rng.choices(list(names), weights=weights, k=count)


def mixed_lengths(
    encode: Callable[[list[dict[str, str]]], list[int]],
    models: Sequence[str],
    seed: int,
    short: tuple[int, int] = (8, 32),
    long: tuple[int, int] = (128, 256),
    long_share: float = 0.3,
) -> list[Request]:
    """Chat prompts from the sample data; most answers short, some long (a heavy tail)."""
    rng = random.Random(seed)
    conversations = sample_messages()
    requests = []
    for model in models:
        messages = rng.choice(conversations)
        low, high = long if rng.random() < long_share else short
        requests.append(Request(encode(messages), model, rng.randint(low, high)))
    return requests


def describe(requests: Sequence[Request]) -> dict[str, Any]:
    lengths = [r.max_tokens for r in requests]
    prompts = [len(r.prompt_ids) for r in requests]
    return {
        "requests": len(requests),
        "distinct_models": len({r.model for r in requests}),
        "max_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "max_tokens_max": max(lengths),
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1),
    }
