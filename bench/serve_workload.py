"""Serving a mixed-length, many-customer workload: continuous batching against the peers.

S-LoRA's workload scaled to this machine, one run, the same requests for every contender:
chat prompts from the sample data (32-65 tokens), answers of 8-32 tokens (70%) or 128-256
(30%) run to their length, adapters drawn by power-law popularity (weight 1/rank).

Contenders (in process, the same driver for each, so the engines are what differs; one
alive at a time, since each computes on its own thread and two alive at once slow each
other on CPU, see bench/common.py):

- ``continuous``: lora-ops' engine (iteration-level scheduling, managed KV cache);
- ``window``: the engine before it (``bench/baselines/window_engine.py``), which gathers
  requests for 50 ms and decodes that batch to its end;
- ``peft_static``: the library baseline, PEFT's ``generate(adapter_names=...)`` over
  static batches (``bench/baselines/peft_static.py``).

Phases:

1. Saturation: ``--clients`` callers in a closed loop (each sends its next request when
   the last one answered): tokens per second while every caller had a request in flight
   (``steady``: the drain after the last request was sent, when the batch empties, left
   out; each request's tokens counted evenly from its first to its last), and over the
   whole run.
2. Below saturation: Poisson arrivals at each of ``--load-fractions`` of the window
   engine's saturated rate, the same arrivals for every contender: TTFT and end-to-end
   p50/p99, and the share of requests whose TTFT met ``--ttft-slo`` (SLO attainment).
3. Over HTTP: the same saturation and first arrival rate against a real ``lora-ops serve``
   replica (streaming chat completions), so the HTTP layer's cost is on record.
4. Many adapters: the continuous engine's saturated throughput with each of
   ``--adapters`` customers (every adapter resident in host memory; loading timed apart)
   against the 5 of phase 1.

Targets: continuous/window saturated throughput >= 2; window/continuous p99 TTFT >= 3 at
the same load below saturation; throughput with 1000 adapters / with 5 >= 0.90.

    python bench/serve_workload.py [--clients 16] [--requests 96] [--adapters 100,1000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from baselines.peft_static import PeftStaticConfig, PeftStaticEngine
from baselines.window_engine import WindowEngine, WindowEngineConfig
from common import pick_device, ratio, report, write_random_adapters
from http_load import closed_loop_http, lora_ops_replica, mixed_length_chats, open_loop_http
from workload import (
    Request,
    Run,
    closed_loop,
    describe,
    mixed_lengths,
    open_loop,
    zipf_models,
)

from lora_ops import base_models
from lora_ops.generation import encode_chat
from lora_ops.lora import LoraSpec
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig

BASE = "smollm2-135m-instruct"
FEW = 5
TARGETS = {"saturated continuous/window": 2.0, "p99 ttft window/continuous": 3.0}
MANY_TARGET = 0.90
DISTINCT_WEIGHTS = 50  # random weight files; more adapters are copies under their own names
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """``count`` adapter folders; beyond DISTINCT_WEIGHTS, copies (each loaded on its own)."""
    spec = LoraSpec(r=rank, alpha=2 * rank, target_modules=TARGET_MODULES)
    distinct = [root / f"weights-{i:03d}" for i in range(min(count, DISTINCT_WEIGHTS))]
    write_random_adapters(base, distinct, spec)
    folders = []
    for index in range(count):
        folder = root / f"customer-{index:04d}"
        shutil.copytree(distinct[index % len(distinct)], folder)
        folders.append(folder)
    return folders


def load_all(engine: Engine | WindowEngine, folders: Sequence[Path]) -> float:
    """Register every adapter and make it resident; the seconds that took."""
    started = time.perf_counter()
    for folder in folders:
        engine.load_adapter(folder.name, AdapterSource(str(folder)))
    with engine._lock:
        failed = engine.cache.ensure_resident([f.name for f in folders])
    if failed:
        raise SystemExit(f"adapters failed to load: {failed}")
    return time.perf_counter() - started


def continuous(base: Path, args: argparse.Namespace, adapters: int) -> Engine:
    config = EngineConfig(
        base,
        max_adapters=max(adapters, FEW),
        max_adapter_bytes=args.adapter_budget_mb * 1024**2,
        max_batch_size=args.batch,
        max_queue=4 * args.requests,
        max_requests_per_model=4 * args.requests,
    )
    return Engine(config)


def in_process(
    base: Path, folders: list[Path], args: argparse.Namespace, requests: list[Request]
) -> tuple[dict[str, Run], dict[str, dict[float, Run]]]:
    """Phases 1 and 2: each contender saturated, then at each arrival rate.

    One contender alive at a time (each computes on its own thread; two alive at once
    slow each other on CPU, see bench/common.py); the window engine first, since the
    arrival rates are fractions of its saturated rate.
    """
    few = {f.name: f for f in folders[:FEW]}

    def window() -> WindowEngine:
        config = WindowEngineConfig(
            base,
            max_adapters=FEW,
            max_batch_size=args.batch,
            batch_window_s=0.05,
            max_queue=4 * args.requests,
        )
        engine = WindowEngine(config)
        load_all(engine, list(few.values()))
        return engine

    def engine() -> Engine:
        built = continuous(base, args, FEW)
        load_all(built, list(few.values()))
        return built

    def peft() -> PeftStaticEngine:
        return PeftStaticEngine(PeftStaticConfig(base, few, max_batch_size=args.batch))

    builders: dict[str, Callable[[], Any]] = {
        "window": window,
        "peft_static": peft,
        "continuous": engine,
    }
    saturated: dict[str, Run] = {}
    below: dict[str, dict[float, Run]] = {}
    for name, build in builders.items():
        contender = build()
        closed_loop(contender, requests[: args.clients], args.clients)  # warm-up
        saturated[name] = closed_loop(contender, requests, args.clients)
        window_rate = saturated["window"].figures()["requests_per_second"]
        below[name] = {
            fraction: open_loop(
                contender, requests[: args.open_requests], fraction * window_rate, args.seed
            )
            for fraction in args.load_fractions
        }
        contender.close()
    return saturated, below


def over_http(
    base: Path, folders: list[Path], args: argparse.Namespace, models: list[str], rate: float
) -> tuple[Run, Run]:
    """Phase 3: a real replica, saturated and at ``rate``, streaming chat completions."""
    chats = mixed_length_chats(models, args.seed)
    serve_args = ["--max-batch-size", str(args.batch), "--max-queue", str(4 * args.requests)]
    adapters = {f.name: f for f in folders[:FEW]}
    with lora_ops_replica(base, adapters, serve_args=serve_args) as replica:
        closed_loop_http(replica.url, chats[: args.clients], args.clients)  # warm-up
        saturated = closed_loop_http(replica.url, chats, args.clients)
        below = open_loop_http(replica.url, chats[: args.open_requests], rate, args.seed)
    return saturated, below


def many_adapters(
    base: Path, folders: list[Path], args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Phase 4: one engine with every customer resident, saturated by requests spread
    over the first 5, then each of ``--adapters`` customers, then 5 again (the two runs
    of 5 bracket the others, so a machine that drifts over minutes shows in their spread
    rather than in the ratio)."""
    most = max(args.adapters)
    engine = continuous(base, args, most)
    load_seconds = load_all(engine, folders[:most])
    names = [f.name for f in folders[:most]]
    runs: list[tuple[int, Run, list[Request]]] = []
    for index, count in enumerate([FEW, *args.adapters, FEW]):
        models = zipf_models(names[:count], args.requests, random.Random(args.seed))
        requests = mixed_lengths(engine.encode_chat, models, args.seed)
        if index == 0:
            closed_loop(engine, requests[: args.clients], args.clients)  # warm-up
        runs.append((count, closed_loop(engine, requests, args.clients), requests))
    shared = {
        "load_all_seconds": round(load_seconds, 1),
        "resident_mb": round(sum(engine.cache.resident.values()) / 1024**2, 1),
        "resident_adapters": len(engine.cache.resident),
        "cache_misses": engine.stats.cache_misses,
        "evictions": engine.stats.evictions,
    }
    engine.close()
    results = [
        {
            **run.figures(),
            "adapters": count,
            "distinct_models": describe(requests)["distinct_models"],
        }
        for count, run, requests in runs
    ]
    return shared, results


def engine_ratios(
    sat: dict[str, dict[str, float]],
    below: dict[str, dict[float, Run]],
    rates: dict[float, float],
    slo: float,
) -> dict[str, float]:
    """Phases 1 and 2 side by side: throughput while saturated, p99 latency at each rate."""
    steady = "steady_tokens_per_second"  # while every client had a request in flight
    ratios: dict[str, float] = {
        "saturated continuous/window": ratio(sat["continuous"][steady], sat["window"][steady]),
        "saturated continuous/peft_static": ratio(
            sat["continuous"][steady], sat["peft_static"][steady]
        ),
        "whole run continuous/window": ratio(
            sat["continuous"]["tokens_per_second"], sat["window"]["tokens_per_second"]
        ),
    }
    for fraction in rates:
        at = {name: runs[fraction].figures(slo) for name, runs in below.items()}
        for peer in ("window", "peft_static"):
            for what in ("ttft_p99_s", "e2e_p99_s"):
                key = f"{what.split('_')[0]} p99 {peer}/continuous at {fraction}"
                ratios[key] = ratio(at[peer][what], at["continuous"][what])
    ratios["p99 ttft window/continuous"] = min(
        v for k, v in ratios.items() if k.startswith("ttft p99 window/continuous")
    )
    return ratios


def parse_args() -> argparse.Namespace:
    numbers: Callable[[str], list[float]] = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of every engine")
    parser.add_argument(
        "--adapters", type=lambda t: [int(x) for x in t.split(",")], default=[100, 1000]
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapter-budget-mb", type=int, default=12288)
    parser.add_argument("--load-fractions", type=numbers, default=[0.5, 0.8])
    parser.add_argument("--open-requests", type=int, default=32, help="sent below saturation")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds, for SLO attainment")
    parser.add_argument("--no-http", action="store_true", help="skip phase 3")
    parser.add_argument("--only-many", action="store_true", help="phase 4 alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    base = base_models.resolve_base(args.base)
    slo = args.ttft_slo
    figures: dict[str, Any] = {"device": str(device), "clients": args.clients, "rank": args.rank}

    with tempfile.TemporaryDirectory(prefix="bench-workload-") as tmp:
        folders = write_adapters(base, Path(tmp), max([FEW, *args.adapters]), args.rank)
        models = zipf_models(
            [f.name for f in folders[:FEW]], args.requests, random.Random(args.seed)
        )
        tokenizer = base_models.load_tokenizer(base)
        requests = mixed_lengths(partial(encode_chat, tokenizer), models, args.seed)
        figures["workload"] = describe(requests)
        saturated: dict[str, Run] = {}
        below: dict[str, dict[float, Run]] = {}
        http: dict[str, Run] = {}
        rates: dict[float, float] = {}
        if not args.only_many:
            saturated, below = in_process(base, folders, args, requests)
            window_rate = saturated["window"].figures()["requests_per_second"]
            rates = {fraction: fraction * window_rate for fraction in args.load_fractions}
        if not (args.no_http or args.only_many):
            first = args.load_fractions[0]
            http["saturated"], http[f"at {first}"] = over_http(
                base, folders, args, models, rates[first]
            )
        many_shared, many = many_adapters(base, folders, args)

    sat = {name: run.figures() for name, run in saturated.items()}
    ratios = engine_ratios(sat, below, rates, slo) if sat else {}
    low = {
        f"at {fraction} ({rates[fraction]:.3f} req/s)": {
            name: runs[fraction].figures(slo) for name, runs in below.items()
        }
        for fraction in rates
    }
    steady = "steady_tokens_per_second"  # while every client had a request in flight
    few_runs = [item["steady_tokens_per_second"] for item in many if item["adapters"] == FEW]
    few_steady = sum(few_runs) / len(few_runs)
    for item in many:
        if item["adapters"] != FEW:
            ratios[f"{item['adapters']} adapters/{FEW}"] = ratio(
                item["steady_tokens_per_second"], few_steady
            )
    ratios[f"{FEW} adapters, second run/first"] = ratio(few_runs[-1], few_runs[0])
    targets = {f"{n} adapters/{FEW}": MANY_TARGET for n in args.adapters}
    if sat:
        targets.update(TARGETS)
    figures.update(
        saturated=sat,
        below_saturation=low,
        http={name: run.figures(slo) for name, run in http.items()},
        many_adapters={**many_shared, "runs": many},
        ratios=ratios,
        targets=targets,
        targets_met={name: ratios[name] >= target for name, target in targets.items()},
    )
    if http:
        ratios["saturated http/in-process"] = ratio(
            figures["http"]["saturated"][steady], sat["continuous"][steady]
        )
    summary = (
        ", ".join(f"{k} {v}" for k, v in ratios.items())
        + "; steady tok/s "
        + ", ".join(f"{name} {fig[steady]}" for name, fig in sat.items())
    )
    report("serve_workload", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
