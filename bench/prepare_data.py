"""Preparing customer data at scale: peak memory and time against the number of examples.

Generates N chat examples (JSONL) for each size, then prepares each file in a fresh process
(``lora_ops.data.arrow_prepare.prepare_cached``: the streaming check, ``datasets`` ``map``
tokenizing on tiny-llama's tokenizer, the Arrow set saved and loaded back memory-mapped),
reporting that process's peak RSS, its tokenizing workers' peak RSS, the peak private
memory of both (:class:`PrivateMemory` says why RSS alone misleads here) and the time. The
largest file is then prepared again with the same settings: a cache hit, with the time it
takes and the number of times anything was tokenized (0).

Target: peak RSS flat in the number of examples (the largest size's over the smallest's
close to 1), and the second prepare a cache hit.

    python bench/prepare_data.py [--sizes 10000,100000,1000000] [--base tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from common import ratio, report

TOPICS = ("invoice", "delivery", "password", "refund", "warranty", "upgrade", "login", "order")
VERBS = ("track", "change", "cancel", "check", "renew", "reset", "move", "confirm")


def chat_line(index: int, rng: random.Random) -> str:
    """One unique, plausible support conversation (the index makes it unique)."""
    topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
    question = f"Hi, how do I {verb} my {topic}? My reference is {index:08d}."
    steps = " ".join(
        f"Step {n}: open {rng.choice(TOPICS)} settings and choose {rng.choice(VERBS)}."
        for n in range(1, rng.randint(2, 4))
    )
    answer = f"To {verb} your {topic} (reference {index:08d}): {steps} Anything else?"
    messages = [
        {"role": "system", "content": "You are a helpful support agent."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return json.dumps({"messages": messages})


def generate(path: Path, count: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for index in range(count):
            f.write(chat_line(index, rng) + "\n")


class PrivateMemory:
    """Peak private (anonymous) resident memory of this process and of its workers, sampled.

    ``ru_maxrss`` also counts the pages of memory-mapped Arrow files a process has read:
    page cache the kernel can drop at any time, and as large as the files. Private memory
    is what a data set held in RAM would take, so it is sampled too, every 50 ms: this
    process's anonymous pages (rss - shared), and what each forked worker adds (its USS,
    so the pages it still shares copy-on-write with this process are counted once).
    """

    def __init__(self) -> None:
        self.main = self.workers = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PrivateMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.05):
            try:
                info = me.memory_info()
                main = int(info.rss - info.shared)
                workers = sum(p.memory_full_info().uss for p in me.children(recursive=True))
            except psutil.Error:  # a worker ended between listing and reading it
                continue
            self.main, self.workers = max(self.main, main), max(self.workers, workers)
            self.total = max(self.total, main + workers)


def child(args: argparse.Namespace) -> None:
    """Prepare one file in this process; print its figures as one JSON line."""
    from lora_ops import base_models
    from lora_ops.data import arrow_prepare

    calls = {"tokenize": 0}
    real_tokenize = arrow_prepare.tokenize_staged

    def counted(*a: Any, **kw: Any) -> Any:
        calls["tokenize"] += 1
        return real_tokenize(*a, **kw)

    arrow_prepare.tokenize_staged = counted  # type: ignore[assignment]
    tokenizer = base_models.load_tokenizer(base_models.resolve_base(args.base))
    settings = arrow_prepare.PrepareSettings(max_seq_len=args.max_seq_len)
    started = time.perf_counter()
    with PrivateMemory() as private:
        prepared = arrow_prepare.prepare_cached(
            Path(args.child), tokenizer, Path(args.cache), settings
        )
        first_row = prepared.train[0]  # read through the memory map, as training does
    seconds = time.perf_counter() - started
    figures = {
        "seconds": round(seconds, 2),
        "cache_hit": prepared.cache_hit,
        "tokenize_calls": calls["tokenize"],
        "train": len(prepared.train),
        "eval": len(prepared.eval),
        "first_row_tokens": len(first_row.input_ids),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "workers_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_private_bytes": private.main,
        "workers_peak_private_bytes": private.workers,
        "peak_private_total_bytes": private.total,
    }
    print(json.dumps(figures), flush=True)


def prepare_in_child(path: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(path), "--cache", str(cache)]
    command += ["--base", args.base, "--max-seq-len", str(args.max_seq_len)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"preparing {path} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["wall_seconds"] = round(time.perf_counter() - started, 2)
    figures["peak_rss_mb"] = round(figures["peak_rss_bytes"] / 2**20, 1)
    for name in ("peak_rss", "workers_peak_rss", "peak_private", "workers_peak_private"):
        figures[f"{name}_mb"] = round(figures[f"{name}_bytes"] / 2**20, 1)
    figures["peak_private_total_mb"] = round(figures["peak_private_total_bytes"] / 2**20, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated")
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as scratch:
        work = Path(scratch)
        by_size: dict[str, dict[str, Any]] = {}
        for size in sizes:
            data = work / f"chat-{size}.jsonl"
            generate(data, size)
            by_size[str(size)] = prepare_in_child(data, work / "cache", args)
            print(f"{size}: {json.dumps(by_size[str(size)])}", file=sys.stderr, flush=True)
        again = prepare_in_child(work / f"chat-{sizes[-1]}.jsonl", work / "cache", args)
    smallest, largest = by_size[str(sizes[0])], by_size[str(sizes[-1])]
    figures = {
        "base": args.base,
        "max_seq_len": args.max_seq_len,
        "sizes": by_size,
        "second_prepare_of_largest": again,
        "peak_rss_largest_over_smallest": ratio(
            largest["peak_rss_bytes"], smallest["peak_rss_bytes"]
        ),
        "peak_private_largest_over_smallest": ratio(
            largest["peak_private_total_bytes"], smallest["peak_private_total_bytes"]
        ),
        "second_prepare_is_cache_hit": again["cache_hit"] and again["tokenize_calls"] == 0,
    }
    rss = ", ".join(
        f"{size}: {f['peak_rss_mb']} MB RSS, {f['peak_private_total_mb']} MB private, "
        f"{f['seconds']} s"
        for size, f in by_size.items()
    )
    summary = (
        f"by size: {rss}; "
        f"second prepare of {sizes[-1]}: {again['seconds']} s, cache hit {again['cache_hit']}, "
        f"{again['tokenize_calls']} tokenizing passes"
    )
    report("prepare_data", figures, torch.device("cpu"), summary, write=not args.no_write)


if __name__ == "__main__":
    main()
