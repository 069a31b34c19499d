"""The fleet's front door: what the gateway adds to a request, and what placement saves.

Real ``lora-ops serve`` replicas of tiny-llama on loopback ports, CPU-light requests (a
non-streamed chat completion of one token, temperature 0), so the figures describe the
routing, not the model.

The gateway is ``lora-ops gateway --no-control`` as users run it, routing by the placement
this script records in a SQLite service database (replicas with their declared base, each
customer's placed replicas); no fleet controller runs, so the placement stays as planned.

1. Gateway added latency. The same request (the base model) sent straight to a replica and
   through the gateway in front of the fleet, the two alternating (the order swapped every
   round), ``--latency-requests`` each, each over its own kept-alive
   connection: p50 and p99 of both and their differences. The gateway's own
   ``lora_ops_gateway_overhead_seconds`` histogram (its time minus its waits on the
   replica's answer, httpx's client work inside those waits) is read from its /metrics
   before and after the timed requests. Target: added p50 < 2 ms.
2. Cold loads, placement against random routing. ``--replicas`` replicas of one base;
   ``--customers`` customers, each with its own random LoRA adapter in a local folder;
   customer popularity a power law (weight 1/rank^``--zipf``, ranks shuffled by
   ``--seed``). One request sequence, ``--warm-up`` requests then ``--requests`` counted
   ones, ``--concurrency`` in flight, is sent three times:

   a. ``placement``: ``lora_ops.fleet.placement.place(k=--copies)``; each customer's adapter
      is loaded only on its placed replicas, and the requests go through the gateway, which
      keeps a customer on its leading copy unless that one has more than 2 requests in
      flight above the other's;
   b. ``preferred``: the same loads, each request straight to the customer's leading copy
      (the gateway with no spilling at all);
   c. ``random``: every adapter registered on every replica; each request straight to a
      replica drawn uniformly (seeded).

   Cold loads are the replicas' ``lora_ops_cache_misses_total``, summed, read after the
   warm-up and after the counted requests (registering an adapter loads it too: those are
   not counted), per 1,000 counted requests; the reduction is 1 - placement/random.
   Target: reduction >= 0.90.

   The whole comparison runs once per ``--cache`` entry (each replica's
   ``--max-adapters``), on fresh replicas: a number, or ``fit``, the most customers the
   placement gives one replica (about copies x customers / replicas), so that every
   placed adapter stays resident, the memory placement is sized for. Below that, a
   replica still reloads the less popular of its own customers, and the reduction
   measures how much narrower its working set is, not whether it fits.

    python bench/fleet_gateway.py [--latency-requests 300] [--cache 8,fit] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from common import alternate, percentile, pick_device, ratio, report, write_random_adapters
from http_load import (
    Replica,
    free_port,
    replica_command,
    running_server,
    stop_process,
    wait_ready,
)

from lora_ops import base_models
from lora_ops.fleet.placement import Placement, place
from lora_ops.lora import LoraSpec

BASE = "tiny-llama"
BASE_KEY = "bench-base"  # every replica and customer share one base in the placement
SPEC = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
TOKEN = "fleet-gateway-bench-token"  # the fleet's admin token: every replica and the gateway
CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]
TARGET_ADDED_P50_MS = 2.0
TARGET_REDUCTION = 0.90
LATENCY_WARM_UP = 20  # per contender, not counted: connections, first-call imports
MISSES = "lora_ops_cache_misses_total"
OVERHEAD = "lora_ops_gateway_overhead_seconds"
FIT = "fit"  # --cache entry: room for the most customers placed on one replica


def main() -> None:
    args = parse_args()
    device = pick_device("cpu")  # the replicas' device is their own; this process computes none
    work = Path(tempfile.mkdtemp(prefix="fleet-gateway-bench-", dir="/tmp"))
    try:
        figures = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report("fleet_gateway", figures, device, row_summary(figures), write=not args.no_write)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--latency-requests", type=int, default=300, help="per contender")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--customers", type=int, default=60)
    parser.add_argument("--copies", type=int, default=2, help="placement's k")
    parser.add_argument(
        "--cache",
        type=cache_sizes,
        default=cache_sizes("8,fit"),
        help="each replica's --max-adapters, one fleet per entry: numbers or 'fit'",
    )
    parser.add_argument("--requests", type=int, default=1000, help="counted, per routing")
    parser.add_argument("--warm-up", type=int, default=200, help="sent first, not counted")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity 1/rank^s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder in /tmp")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    if min(args.latency_requests, args.replicas, args.customers, args.copies) < 1:
        parser.error("--latency-requests, --replicas, --customers and --copies must be >= 1")
    if min(args.requests, args.concurrency) < 1 or args.warm_up < 0:
        parser.error("--requests and --concurrency must be >= 1, --warm-up >= 0")
    return args


def cache_sizes(text: str) -> list[str]:
    """``8,fit`` -> ``["8", "fit"]``; each entry a positive number or ``fit``."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries or any(e != FIT and not (e.isdigit() and int(e) >= 1) for e in entries):
        raise argparse.ArgumentTypeError(f"not a list of sizes (numbers >= 1 or 'fit'): {text}")
    return entries


def row_summary(figures: dict[str, Any]) -> str:
    """The RESULTS.md row: added latency, then cold loads per 1,000 requests per cache."""
    latency, met = figures["latency_ms"], figures["targets_met"]
    parts = [
        f"gateway added p50 {latency['added_p50']:.2f} ms ({verdict(met['added_p50'])}), p99 "
        f"{latency['added_p99']:.2f} ms (direct p50 {latency['direct']['p50']:.2f} ms, "
        f"n={latency['direct']['n']}); gateway's own time p50 ~"
        f"{figures['gateway_overhead_ms']['p50_est']:.2f} ms, mean "
        f"{figures['gateway_overhead_ms']['mean']:.2f} ms"
    ]
    for run in figures["cold_loads"]:
        per = run["per_1000"]
        parts.append(
            f"cache {run['cache']}{' (fit)' if run['cache_rule'] == FIT else ''}: cold loads "
            f"per 1,000 placement {per['placement']:.0f}, preferred-only {per['preferred']:.0f}, "
            f"random {per['random']:.0f}, reduction {run['reduction']:.3f} "
            f"({verdict(met['reduction'][run['cache_rule']])})"
        )
    fleet = figures["fleet"]
    parts.append(
        f"{fleet['replicas']} replicas, {fleet['customers']} customers, k={fleet['copies']}, "
        f"zipf {fleet['zipf']}, {fleet['concurrency']} in flight"
    )
    return "; ".join(parts)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()[0]  # other work on the machine skews every timing here
    base = base_models.resolve_base(args.base)
    customers = [f"cust-{i:03d}" for i in range(args.customers)]
    root = work / "adapters"
    log(f"writing {len(customers)} adapters under {root}")
    write_random_adapters(base, [root / name for name in customers], SPEC)
    seconds: dict[str, float] = {"make_adapters": round(time.monotonic() - started, 1)}
    sequence = popular_sequence(customers, args.warm_up + args.requests, args.zipf, args.seed)
    latency: dict[str, Any] = {}
    overhead: dict[str, Any] = {}
    cold = []
    for rule in args.cache:
        ports = [free_port() for _ in range(args.replicas)]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        plan = place(dict.fromkeys(customers, BASE_KEY), dict.fromkeys(urls, BASE_KEY), args.copies)
        most = max(len(plan.customers_of(url)) for url in urls)
        cache = most if rule == FIT else int(rule)
        phase = time.monotonic()
        log(f"starting {args.replicas} replicas (--max-adapters {cache})")
        with (
            fleet(base, root, cache, ports, work) as replicas,
            fleet_gateway(base, plan, work / f"fleet-{cache}.db", work) as gateway,
        ):
            seconds[f"start_replicas_cache_{cache}"] = round(time.monotonic() - phase, 1)
            if not latency:
                phase = time.monotonic()
                latency, overhead = gateway_latency(replicas[0], gateway, args.latency_requests)
                seconds["latency"] = round(time.monotonic() - phase, 1)
            phase = time.monotonic()
            figures = cold_loads(args, replicas, plan, sequence, root, gateway)
            cold.append({"cache": cache, "cache_rule": rule, **figures})
            seconds[f"cold_loads_cache_{cache}"] = round(time.monotonic() - phase, 1)
    seconds["total"] = round(time.monotonic() - started, 1)
    counted = sequence[args.warm_up :]
    return {
        "base": base_models.base_name(base),
        "latency_ms": latency,
        "gateway_overhead_ms": overhead,
        "cold_loads": cold,
        "fleet": {
            "replicas": args.replicas,
            "customers": args.customers,
            "copies": args.copies,
            "zipf": args.zipf,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "warm_up": args.warm_up,
            "requests": args.requests,
            "distinct_customers_counted": len(set(counted)),
            "top_customer_share": round(max(map(counted.count, set(counted))) / len(counted), 3),
            "lora": {"r": SPEC.r, "targets": list(SPEC.target_modules)},
        },
        "routing": {
            "placement": "through `lora-ops gateway --no-control` (the customer's "
            f"{args.copies} placed replicas, its leading copy unless busier by 2 in flight)",
            "preferred": "direct to the customer's leading copy",
            "random": "direct to a replica drawn uniformly, every adapter on every replica",
        },
        "targets": {
            "added_p50": f"< {TARGET_ADDED_P50_MS} ms",
            "reduction": f">= {TARGET_REDUCTION}",
        },
        "targets_met": {
            "added_p50": latency["added_p50"] < TARGET_ADDED_P50_MS,
            "reduction": {run["cache_rule"]: run["reduction"] >= TARGET_REDUCTION for run in cold},
        },
        "seconds": seconds,
        "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
    }


# -- 1. the gateway's added latency ---------------------------------------------------------


def gateway_latency(
    target: Replica, url: str, requests: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Direct and through-the-gateway chat completions, alternating; milliseconds."""
    log(f"latency: {requests} chat completions direct and through the gateway, alternating")
    with (
        httpx.Client(base_url=target.url, trust_env=False, timeout=60) as direct,
        httpx.Client(base_url=url, trust_env=False, timeout=60) as gateway,
    ):
        contenders = {"direct": chat_call(direct), "gateway": chat_call(gateway)}
        alternate(contenders, LATENCY_WARM_UP, torch.device("cpu"))
        before = histogram(gateway, OVERHEAD)
        times = alternate(contenders, requests, torch.device("cpu"))
        after = histogram(gateway, OVERHEAD)
    ms = {name: [s * 1000 for s in values] for name, values in times.items()}
    figures: dict[str, Any] = {name: summary(values) for name, values in ms.items()}
    figures["added_p50"] = round(figures["gateway"]["p50"] - figures["direct"]["p50"], 3)
    figures["added_p99"] = round(figures["gateway"]["p99"] - figures["direct"]["p99"], 3)
    figures["gateway/direct p50"] = ratio(figures["gateway"]["p50"], figures["direct"]["p50"])
    return figures, overhead_figures(before, after)


def chat_call(client: httpx.Client) -> Callable[[], None]:
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}

    def call() -> None:
        response = client.post(CHAT_PATH, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{client.base_url}: {response.status_code} {response.text}")

    return call


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(sum(values) / len(values), 3),
    }


def histogram(client: httpx.Client, name: str) -> dict[str, float]:
    """A Prometheus histogram's cumulative buckets (by ``le``), ``sum`` and ``count``."""
    found: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            found[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((f"{name}_sum ", f"{name}_count ")):
            key, value = line.split()
            found[key.rsplit("_", 1)[1]] = float(value)
    return found


def overhead_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The gateway's own time over the timed requests: mean, and quantiles as Prometheus'
    ``histogram_quantile`` estimates them (linear within a bucket)."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    count = delta.get("count", 0.0)
    if not count:
        return {"n": 0, "mean": float("nan"), "p50_est": float("nan"), "p99_est": float("nan")}
    buckets = sorted(
        ((float(le), delta[le]) for le in delta if le not in ("sum", "count")),
        key=lambda pair: pair[0],
    )
    return {
        "n": int(count),
        "mean": round(delta["sum"] / count * 1000, 3),
        "p50_est": round(bucket_quantile(buckets, 0.50) * 1000, 3),
        "p99_est": round(bucket_quantile(buckets, 0.99) * 1000, 3),
        "share_under_1ms": round(dict(buckets).get(0.001, 0.0) / count, 3),
    }


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """``q`` of cumulative ``(upper bound, count)`` buckets, linear within the bucket."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # past the last finite bound: its bound is all one can say
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, cumulative
    return lower


# -- 2. cold loads: placement against random routing -----------------------------------------


def cold_loads(
    args: argparse.Namespace,
    replicas: list[Replica],
    plan: Placement,
    sequence: list[str],
    root: Path,
    gateway: str,
) -> dict[str, Any]:
    """The three routings of ``sequence`` over ``replicas``; cold loads of each."""
    urls = [r.url for r in replicas]
    by_url = {r.url: r for r in replicas}
    customers = sorted(plan.assignment)
    picker = random.Random(args.seed + 1)
    random_urls = [picker.choice(urls) for _ in sequence]
    preferred_urls = [plan.replicas_of(customer)[0] for customer in sequence]

    log("placement: registering each adapter on its placed replicas only")
    for customer in customers:
        for url in plan.replicas_of(customer):
            by_url[url].load_adapter(customer, root / customer)
    log(f"placement: {len(sequence)} requests through the gateway")
    before = gateway_requests(gateway, urls)
    placed = count_misses(urls, [gateway] * len(sequence), sequence, args)
    after = gateway_requests(gateway, urls)
    placed["requests_by_replica"] = [a - b for a, b in zip(after, before, strict=True)]
    log(f"preferred: {len(sequence)} requests, each to the customer's preferred replica")
    preferred = count_misses(urls, preferred_urls, sequence, args)
    log("random: registering every adapter on every replica")
    for customer in customers:
        for url in urls:
            if url not in plan.replicas_of(customer):
                by_url[url].load_adapter(customer, root / customer)
    log(f"random: {len(sequence)} requests, each to a uniformly drawn replica")
    uniform = count_misses(urls, random_urls, sequence, args)

    runs = {"placement": placed, "preferred": preferred, "random": uniform}
    per_1000 = {name: round(r["cold_loads"] * 1000 / args.requests, 1) for name, r in runs.items()}
    return {
        "per_1000": per_1000,
        "reduction": reduction(per_1000["placement"], per_1000["random"]),
        "reduction_preferred": reduction(per_1000["preferred"], per_1000["random"]),
        "customers_placed_per_replica": [len(plan.customers_of(url)) for url in urls],
        **runs,
    }


def reduction(ours: float, theirs: float) -> float:
    return round(1 - ours / theirs, 3) if theirs else float("nan")


def popular_sequence(customers: list[str], count: int, s: float, seed: int) -> list[str]:
    """``count`` customers drawn with weight 1/rank^s, the ranks a seeded shuffle."""
    rng = random.Random(seed)
    ranked = rng.sample(customers, len(customers))
    weights = [1 / (rank + 1) ** s for rank in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=count)


def count_misses(
    replica_urls: list[str],
    targets: list[str],
    sequence: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Send ``sequence[i]`` to ``targets[i]``; cache misses over the counted part."""
    warm = args.warm_up
    send_all(list(zip(targets[:warm], sequence[:warm], strict=True)), args.concurrency)
    before = [replica_metric(url, MISSES) for url in replica_urls]
    started = time.perf_counter()
    failed = send_all(list(zip(targets[warm:], sequence[warm:], strict=True)), args.concurrency)
    seconds = time.perf_counter() - started
    after = [replica_metric(url, MISSES) for url in replica_urls]
    by_replica = [int(a - b) for a, b in zip(after, before, strict=True)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    return {
        "cold_loads": sum(by_replica),
        "cold_loads_by_replica": by_replica,
        "seconds": round(seconds, 1),
    }


def send_all(work: list[tuple[str, str]], concurrency: int) -> list[str]:
    """One-token chat completions, ``(url, model)`` in order, ``concurrency`` in flight;
    returns what failed."""
    failures: list[str] = []

    async def drive() -> None:
        pending = iter(work)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(trust_env=False, timeout=120, limits=limits) as client:

            async def caller() -> None:
                for url, model in pending:  # one event loop: the shared iterator needs no lock
                    body = {"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
                    try:
                        response = await client.post(url + CHAT_PATH, json=body)
                    except httpx.HTTPError as exc:
                        failures.append(f"{model} via {url}: {exc!r}")
                        continue
                    if response.status_code != 200:
                        failures.append(f"{model} via {url}: {response.status_code}")

            await asyncio.gather(*(caller() for _ in range(concurrency)))

    asyncio.run(drive())
    return failures


def replica_metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", trust_env=False, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} not in {url}/metrics")


def gateway_requests(gateway: str, urls: list[str]) -> list[int]:
    """Answered requests per replica (in ``urls``' order), from the gateway's /metrics."""
    counts = dict.fromkeys(urls, 0)
    text = httpx.get(gateway + "/metrics", trust_env=False, timeout=30).text
    for line in text.splitlines():
        if line.startswith("lora_ops_gateway_requests_total{") and 'outcome="ok"' in line:
            url = line.split('replica="', 1)[1].split('"', 1)[0]
            counts[url] = counts.get(url, 0) + int(float(line.rsplit(" ", 1)[1]))
    return [counts[url] for url in urls]


@contextlib.contextmanager
def fleet_gateway(base: Path, plan: Placement, database: Path, work: Path) -> Iterator[str]:
    """``lora-ops gateway --no-control`` over a service database holding ``plan``."""
    from lora_ops.db import Database

    url_of_db = f"sqlite:///{database}"
    db = Database(url_of_db)
    name, sha256 = base_models.base_name(base), base_models.base_sha256(base)
    for url in plan.replicas:
        db.add_replica(url, name, sha256)
    for customer in sorted(plan.assignment):
        db.place(customer, sha256, plan.replicas_of(customer))
    db.engine.dispose()
    port = free_port()
    command = [sys.executable, "-m", "lora_ops", "gateway", "--no-control"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {
        "LORA_OPS_ADMIN_TOKEN": TOKEN,
        "LORA_OPS_DATABASE_URL": url_of_db,
        "PYTHONUNBUFFERED": "1",
    }
    log_path = work / f"gateway-{port}.log"
    with running_server(command, url + "/health", log_path, env, 120, "gateway"):
        yield url


# -- the replicas ---------------------------------------------------------------------------


@contextlib.contextmanager
def fleet(
    base: Path, root: Path, cache: int, ports: list[int], work: Path
) -> Iterator[list[Replica]]:
    """``lora-ops serve`` of ``base`` on each port, started together, the fleet's token;
    every one stopped on the way out, whatever happened."""
    env = {**os.environ, "LORA_OPS_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    replicas: list[Replica] = []
    try:
        for port in ports:
            log_path = work / f"replica-{port}.log"
            command = replica_command(base, port, root, ["--max-adapters", str(cache)])
            with log_path.open("ab") as sink:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            replicas.append(Replica(f"http://127.0.0.1:{port}", TOKEN, process, log_path))
        for r in replicas:
            wait_ready(r.url + "/health", r.process, r.log, 300, f"replica {r.url}")
        yield replicas
    finally:
        for r in replicas:
            stop_process(r.process)


def log(message: str) -> None:
    print(f"[fleet_gateway] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
