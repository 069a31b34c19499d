"""Adapter hot-load into a running replica, from local disk and from S3; memory at 1,000 adapters.

A real ``lora-ops serve`` process of SmolLM2-135M-Instruct, the embedded stack's S3 server
(``rclone serve s3``) beside it, and r=16 adapters on q/k/v/o made with the project's own
LoRA code, each with different random weights. Every load is ``POST /v1/load_lora_adapter``
under a new name, timed end to end by a client that keeps its connection (as a fleet
client would); local folders lie under the replica's ``--adapter-root``, S3 folders in the
stack's bucket. Targets: p50 under 100 ms from local disk, under 300 ms from S3.

1. Empty cache: local and S3 loads alternate, each adapter unloaded again after its load.
2. Full cache: the replica is filled to ``--cache`` (64) adapters, then loaded until it
   knows ``--adapters`` (1,000), the S3 loads spread among the local ones; every load
   evicts the least recently used adapter.
3. Churn: ``--requests`` one-token completions, ``--concurrency`` at a time, each naming a
   registered adapter in a shuffled order, so the cache evicts and loads back all the time.

The replica's resident memory (VmRSS) is sampled throughout. Target: its peak stays within
(base-only RSS + cache x adapter bytes) + 10 %. Base-only is taken after a request to the
base model, so the forward pass's own buffers count as base.

Adapter files (~7 MB each) live in a folder under /tmp that is removed at the end
(``--keep`` keeps it); they were just written, so "local disk" reads come from the page
cache. The replica runs on CUDA when there is one (``--device``); resident adapters then
sit in GPU memory, and the RSS target is looser than it needs to be.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from common import percentile, pick_device, report, write_random_adapters

from lora_ops import base_models
from lora_ops.lora import LoraSpec
from lora_ops.settings import Settings
from lora_ops.stack import environment, health, parts
from lora_ops.storage import Storage

BASE = "smollm2-135m-instruct"
SPEC = LoraSpec(r=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
TOKEN = "adapter-load-bench-token"
MIB = 1024 * 1024
TARGETS_P50_MS = {"local": 100.0, "s3": 300.0}
MEMORY_MARGIN = 0.10
WARM_UP_LOADS = 3  # per source, not counted: the first loads import and build clients


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="adapter-load-bench-", dir="/tmp"))
    try:
        figures = run(args, device, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report("adapter_load", figures, device, row_summary(figures), write=not args.no_write)


def row_summary(figures: dict[str, Any]) -> str:
    """The RESULTS.md row: p50/p99 per source and cache state, and the memory verdict."""
    parts = []
    for state in ("empty", "full"):
        loads = figures[f"{state}_cache_ms"]
        sources = " · ".join(
            f"{source} {loads[source]['p50']:.0f}/{loads[source]['p99']:.0f}"
            f"{'' if figures['targets_met'][f'{source}_{state}'] else ' MISSED'}"
            for source in ("local", "s3")
        )
        parts.append(f"{state} cache: {sources}")
    memory = figures["memory"]
    verdict = "met" if memory["target_met"] else "MISSED"
    return (
        f"load p50/p99 ms, {'; '.join(parts)}; {figures['adapters_registered']} adapters, "
        f"cache {figures['cache']}: RSS peak {memory['rss_max_mb']:.0f} MB, limit "
        f"{memory['limit_mb']:.0f} MB ({verdict})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--loads", type=int, default=60, help="timed loads per source")
    parser.add_argument("--adapters", type=int, default=1000, help="adapters registered")
    parser.add_argument("--cache", type=int, default=64, help="the replica's --max-adapters")
    parser.add_argument("--requests", type=int, default=200, help="completions in the churn")
    parser.add_argument("--concurrency", type=int, default=8, help="completions at a time")
    parser.add_argument("--quick", action="store_true", help="20 loads, 200 adapters, 100 asks")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--keep", action="store_true", help="keep the work folder in /tmp")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.loads, args.adapters, args.requests = 20, 200, 100
    if args.adapters < 2 * (args.loads + WARM_UP_LOADS) or min(args.loads, args.cache) < 1:
        parser.error("--adapters must be at least 2 x (--loads + 3); --loads, --cache >= 1")
    return args


def run(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    load_before = os.getloadavg()[0]  # other work on the machine skews every timing here
    base = base_models.resolve_base(args.base)
    local_root, s3_root = work / "adapters", work / "s3-source"
    log(f"writing {args.adapters} adapters under {work}")
    s3_count = args.loads + WARM_UP_LOADS
    adapter_bytes = make_adapters(base, local_root, s3_root, args.adapters - s3_count, s3_count)
    local = sorted(local_root.iterdir())
    made_s = time.monotonic() - started
    settings = Settings(state_dir=work / "stack", s3_port=free_port(), bucket="lora-ops")
    serving = replica(args, base, device, settings, local_root, work)
    with s3_server(settings) as storage, serving as rep:
        s3 = upload(storage, s3_root, settings.bucket)
        with RssSampler(rep.pid) as sampler:
            rep.complete("base")  # the forward pass's buffers count as the base's
            rss_base = sampler.settle()
            first = warm_up(rep, local[:WARM_UP_LOADS], s3[:WARM_UP_LOADS])
            phase = time.monotonic()
            empty = empty_cache_loads(rep, local[WARM_UP_LOADS:s3_count], s3[WARM_UP_LOADS:])
            log(f"empty cache: {summary_of(empty)}")
            log(f"filling the cache, then loading until {args.adapters} adapters are known")
            for folder in local[: args.cache]:
                rep.load(folder.name, str(folder))
            full = full_cache_loads(rep, local[args.cache :], s3)
            log(f"full cache: {summary_of(full)}")
            loads_s = time.monotonic() - phase
            rss_registered = sampler.settle()
            sampler.mark()
            log(f"{args.requests} completions over {args.adapters} adapters")
            churn = churn_requests(rep, args.requests, args.concurrency)
            rss_churn_max = sampler.peak_since_mark()
            rss_end = sampler.settle()
            rss_max = sampler.peak()
        evictions = rep.metric("lora_ops_cache_evictions_total")
        misses = rep.metric("lora_ops_cache_misses_total")
        registered = len(rep.models()) - 1
    limit = (rss_base + args.cache * adapter_bytes) * (1 + MEMORY_MARGIN)
    memory = {
        "adapter_mb": round(adapter_bytes / MIB, 2),
        "rss_base_mb": mb(rss_base),
        "rss_after_loads_mb": mb(rss_registered),
        "rss_churn_max_mb": mb(rss_churn_max),
        "rss_end_mb": mb(rss_end),
        "rss_max_mb": mb(rss_max),
        "limit_mb": mb(limit),
        "after_loads_over_base_in_adapters": round((rss_registered - rss_base) / adapter_bytes, 1),
        "peak_over_base_in_adapters": round((rss_max - rss_base) / adapter_bytes, 1),
        "target_met": rss_max <= limit,
    }
    return {
        "base": base_models.base_name(base),
        "replica_device": device.type,
        "lora": {"r": SPEC.r, "alpha": SPEC.alpha, "targets": list(SPEC.target_modules)},
        "empty_cache_ms": empty,
        "full_cache_ms": full,
        "first_loads_ms": first,
        "targets_met": {
            f"{source}_{state}": loads[source]["p50"] < TARGETS_P50_MS[source]
            for state, loads in (("empty", empty), ("full", full))
            for source in ("local", "s3")
        },
        "adapters_registered": registered,
        "cache": args.cache,
        "churn": {**churn, "evictions": int(evictions), "cache_misses": int(misses)},
        "memory": memory,
        "seconds": {
            "make_adapters": round(made_s, 1),
            "loads": round(loads_s, 1),
            "churn": churn["seconds"],
            "total": round(time.monotonic() - started, 1),
        },
        "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
    }


# -- adapters -------------------------------------------------------------------------------


def make_adapters(base: Path, local_root: Path, s3_root: Path, local: int, s3: int) -> int:
    """``local`` adapters under ``local_root``, ``s3`` under ``s3_root`` (uploaded later).

    Returns the bytes of one adapter's weights.
    """
    folders = [local_root / adapter_name("l", i) for i in range(local)]
    folders += [s3_root / adapter_name("s", i) for i in range(s3)]
    return write_random_adapters(base, folders, SPEC)


def adapter_name(kind: str, index: int) -> str:
    return f"{kind}{index:04d}"


def upload(storage: Storage, s3_root: Path, bucket: str) -> list[str]:
    uris = []
    for folder in sorted(s3_root.iterdir()):
        uri = f"s3://{bucket}/bench/adapters/{folder.name}/"
        storage.upload_dir(folder, uri, progress=False)
        uris.append(uri)
    return uris


# -- the phases -----------------------------------------------------------------------------


def warm_up(rep: ReplicaClient, local: list[Path], s3: list[str]) -> dict[str, float]:
    """The first loads from each source, not counted: they import and build clients."""
    first: dict[str, float] = {}
    for i, (folder, uri) in enumerate(zip(local, s3, strict=True)):
        first[f"local_{i}"] = round(rep.load(f"w-{folder.name}", str(folder)), 1)
        first[f"s3_{i}"] = round(rep.load(f"w-s{i}", uri), 1)
        rep.unload(f"w-{folder.name}")
        rep.unload(f"w-s{i}")
    return first


def empty_cache_loads(
    rep: ReplicaClient, local: list[Path], s3: list[str]
) -> dict[str, dict[str, float]]:
    """Local and S3 loads in turn, each unloaded after it: the cache holds nothing else."""
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for i, (folder, uri) in enumerate(zip(local, s3, strict=True)):
        pairs = [("local", f"e-{folder.name}", str(folder)), ("s3", f"e-s{i}", uri)]
        if i % 2:
            pairs.reverse()  # neither source always follows the other
        for source, name, path in pairs:
            times[source].append(rep.load(name, path))
            rep.unload(name)
    return {source: stats(values) for source, values in times.items()}


def full_cache_loads(
    rep: ReplicaClient, local: list[Path], s3: list[str]
) -> dict[str, dict[str, float]]:
    """Load every folder under its own name, the S3 ones spread evenly among the local."""
    plan = [("local", folder.name, str(folder)) for folder in local]
    spacing = len(plan) / len(s3)
    for i, uri in enumerate(s3):  # the i S3 loads before this one shift it by i
        plan.insert(int((i + 0.5) * spacing) + i, ("s3", f"s{i:04d}", uri))
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for source, name, path in plan:
        times[source].append(rep.load(name, path))
    return {source: stats(values) for source, values in times.items()}


def summary_of(loads: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"{source} p50 {figures['p50']:.0f} ms p99 {figures['p99']:.0f} ms (n={figures['n']:.0f})"
        for source, figures in loads.items()
    )


def churn_requests(rep: ReplicaClient, requests: int, concurrency: int) -> dict[str, object]:
    """One-token completions naming registered adapters in a shuffled order."""
    names = [n for n in rep.models() if n != "base"]
    order = random.Random(0).sample(names, len(names))
    wanted = [order[i % len(order)] for i in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(rep.complete, wanted))
    seconds = time.perf_counter() - started
    latencies = [ms for ms, ok in results if ok]
    return {
        "requests": requests,
        "distinct_adapters": len(set(wanted)),
        "concurrency": concurrency,
        "errors": sum(1 for _, ok in results if not ok),
        "seconds": round(seconds, 1),
        "latency_ms": stats(latencies) if latencies else None,
    }


# -- the servers ----------------------------------------------------------------------------


@contextmanager
def s3_server(settings: Settings) -> Iterator[Storage]:
    """The embedded stack's S3 server alone (rclone), as ``lora-ops stack up`` starts it.

    The stack's own command and environment for its S3 part, without MLflow and Prefect,
    which this benchmark does not need and which would take memory and cores from it.
    """
    state = settings.state_dir
    (state / "s3-data").mkdir(parents=True)
    (state / "logs").mkdir()
    url = settings.s3_endpoint_url
    with (state / "logs" / "s3.log").open("wb") as out:
        process = subprocess.Popen(
            parts.command("s3", settings, state),
            env=environment.child_env("s3", settings, state),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if not health.wait_healthy("s3", url, process, 30):
            raise RuntimeError(f"S3 did not start: {(state / 'logs' / 's3.log').read_text()}")
        storage = Storage.from_settings(settings)
        storage.ensure_bucket(settings.bucket)
        yield storage
    finally:
        stop(process)


class ReplicaClient:
    """The replica's HTTP API over one kept-alive client (a new httpx client costs ~30 ms)."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid
        self.admin = {"Authorization": f"Bearer {TOKEN}"}
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=300)

    def load(self, name: str, path: str) -> float:
        """Milliseconds from sending the load request to its answer."""
        body = {"lora_name": name, "lora_path": path}
        started = time.perf_counter()
        response = self.http.post("/v1/load_lora_adapter", json=body, headers=self.admin)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"loading {name} from {path}: {response.text}")
        return elapsed

    def unload(self, name: str) -> None:
        body = {"lora_name": name}
        self.http.post("/v1/unload_lora_adapter", json=body, headers=self.admin).raise_for_status()

    def complete(self, model: str) -> tuple[float, bool]:
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        started = time.perf_counter()
        response = self.http.post("/v1/completions", json=body)
        return (time.perf_counter() - started) * 1000, response.status_code == 200

    def models(self) -> list[str]:
        answer = self.http.get("/v1/models", headers=self.admin).json()
        return [card["id"] for card in answer["data"]]

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise RuntimeError(f"{name} not in /metrics")

    def close(self) -> None:
        self.http.close()


@contextmanager
def replica(
    args: argparse.Namespace,
    base: Path,
    device: torch.device,
    settings: Settings,
    root: Path,
    work: Path,
) -> Iterator[ReplicaClient]:
    """``lora-ops serve`` of ``base`` with the S3 server's settings, stopped on exit."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "lora_ops", "serve", "--base", str(base), "--port", str(port)),
        *("--max-adapters", str(args.cache), "--adapter-root", str(root), "--no-bootstrap"),
    ]
    outside = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in outside}
    env |= {
        "LORA_OPS_ADMIN_TOKEN": TOKEN,
        "LORA_OPS_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "LORA_OPS_BUCKET": settings.bucket,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "LORA_OPS_STATE_DIR": str(settings.state_dir),
    }
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log_path = work / "replica.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), process, log_path, 300)
        client = ReplicaClient(url, process.pid)
        try:
            yield client
        finally:
            client.close()
    finally:
        stop(process)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"the replica exited: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica did not answer in {timeout_s} s")
        time.sleep(0.25)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- memory ---------------------------------------------------------------------------------


@dataclass
class RssSampler:
    """The replica's VmRSS every 0.2 s, in a thread."""

    pid: int
    every_s: float = 0.2
    samples: list[int] = field(default_factory=list)
    _mark: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(rss_bytes(self.pid))

    def settle(self, seconds: float = 2.0) -> int:
        """The median of the samples taken over ``seconds`` of quiet."""
        start = len(self.samples)
        time.sleep(seconds)
        quiet = sorted(self.samples[start:]) or [rss_bytes(self.pid)]
        return quiet[len(quiet) // 2]

    def mark(self) -> None:
        self._mark = len(self.samples)

    def peak_since_mark(self) -> int:
        return max(self.samples[self._mark :], default=rss_bytes(self.pid))

    def peak(self) -> int:
        return max(self.samples, default=rss_bytes(self.pid))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# -- figures --------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def mb(value: float) -> float:
    return round(value / MIB, 1)


def log(message: str) -> None:
    print(f"[adapter_load] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
