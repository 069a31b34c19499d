"""Head of line: a short request that arrives while two long ones decode.

For each engine in turn (one alive at a time: each computes on its own thread, see
bench/common.py), alternated round by round: the short request (``--short-tokens``) alone
on an idle engine, then two long requests (``--long-tokens`` each, different adapters)
and, once both are decoding (their first text piece came), the same short request. The
figure is the short request's latency behind the long ones over its latency alone.

- ``continuous``: lora-ops' engine; the short request joins the running batch.
- ``window``: the engine before it (``bench/baselines/window_engine.py``), which decodes a
  batch to its end before it looks at the queue again.

Target: continuous behind/alone <= 3.

    python bench/head_of_line.py [--rounds 3] [--long-tokens 512] [--short-tokens 4]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from baselines.window_engine import WindowEngine, WindowEngineConfig
from common import median, pick_device, ratio, report, write_random_adapters
from workload import Request, Submits, Timing, sample_messages, submit_timed

from lora_ops import base_models
from lora_ops.generation import SamplingParams
from lora_ops.lora import LoraSpec
from lora_ops.serving.engine import AdapterSource, Engine, EngineConfig

BASE = "smollm2-135m-instruct"
TARGET = 3.0
ADAPTERS = ("acme", "globex", "initech")


def short_alone(engine: Submits, short: Request) -> Callable[[], float]:
    def run() -> float:
        timing = Timing(0.0)
        submit_timed(engine, short, timing).result()
        return timing.e2e

    return run


def short_behind_long(engine: Submits, short: Request, longs: list[Request]) -> Callable[[], float]:
    def run() -> float:
        decoding = [threading.Event() for _ in longs]
        futures = [
            engine.submit(
                long.prompt_ids,
                long.model,
                SamplingParams(max_tokens=long.max_tokens, ignore_eos=True),
                on_text=lambda _, __, started=started: started.set(),
            )
            for long, started in zip(longs, decoding, strict=True)
        ]
        for started in decoding:
            if not started.wait(timeout=600):
                raise SystemExit("a long request never started")
        timing = Timing(0.0)
        submit_timed(engine, short, timing).result()
        for future in futures:
            future.result()
        return timing.e2e

    return run


def alternate_runs(
    contenders: dict[str, Callable[[], float]], rounds: int
) -> dict[str, list[float]]:
    """Each contender's own figure per round, after a warm-up, the order rotating."""
    for run in contenders.values():
        run()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(contenders[name]())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    base = base_models.resolve_base(args.base)

    with tempfile.TemporaryDirectory(prefix="bench-hol-") as tmp:
        folders = [Path(tmp) / name for name in ADAPTERS]
        write_random_adapters(base, folders, LoraSpec(r=16, alpha=32))
        builders: dict[str, Callable[[], Submits]] = {
            "continuous": lambda: Engine(EngineConfig(base)),
            "window": lambda: WindowEngine(WindowEngineConfig(base, batch_window_s=0.05)),
        }
        times: dict[str, list[float]] = {}
        # One engine alive at a time: each computes on its own thread (bench/common.py).
        for name, build in builders.items():
            engine = build()
            for adapter, folder in zip(ADAPTERS, folders, strict=True):
                engine.load_adapter(adapter, AdapterSource(str(folder)))  # type: ignore[attr-defined]
            conversations = sample_messages()
            encode = engine.encode_chat  # type: ignore[attr-defined]
            longs = [
                Request(encode(conversations[i]), ADAPTERS[i], args.long_tokens) for i in (0, 1)
            ]
            short = Request(encode(conversations[2]), ADAPTERS[2], args.short_tokens)
            contenders = {
                f"{name}_alone": short_alone(engine, short),
                f"{name}_behind_long": short_behind_long(engine, short, longs),
            }
            times.update(alternate_runs(contenders, args.rounds))
            engine.close()  # type: ignore[attr-defined]

    seconds = {name: median(values) for name, values in times.items()}
    ratios = {
        name: ratio(seconds[f"{name}_behind_long"], seconds[f"{name}_alone"]) for name in builders
    }
    figures = {
        "device": str(device),
        "long_tokens": args.long_tokens,
        "short_tokens": args.short_tokens,
        "rounds": args.rounds,
        "short_latency_median_s": {k: round(v, 3) for k, v in seconds.items()},
        "behind_long/alone": ratios,
        "target": {"continuous behind_long/alone": TARGET},
        "target_met": ratios["continuous"] <= TARGET,
    }
    summary = (
        f"short behind two long / alone: continuous {ratios['continuous']}, "
        f"window {ratios['window']}; short alone s: continuous "
        f"{seconds['continuous_alone']:.3f}, window {seconds['window_alone']:.3f}"
    )
    report("head_of_line", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
