"""What every benchmark shares: the machine it ran on, side-by-side timing, the report.

Each benchmark prints one JSON line of figures and appends a row to ``bench/RESULTS.md``
(between the markers of its own table) with the date, the machine and the command.
Ratios come from alternating the contenders in one run and taking medians, so a machine
that is busier in one minute than the next skews both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch

from lora_ops import base_models
from lora_ops.lora import LoraSpec, apply_lora, lora_layers, save_adapter

RESULTS = Path(__file__).with_name("RESULTS.md")
T = TypeVar("T")


def pick_device(requested: str = "auto") -> torch.device:
    """``cuda`` when there is one (or when asked), else ``cpu``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """A short description: CPU model and cores, or the GPU, plus torch's version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{_cpu_model()}, {os.cpu_count()} cores"
    return f"{what}, torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def alternate(
    contenders: Mapping[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Time each contender once per round, rotating the order every round.

    Returns the seconds of every call, by contender. Rotating keeps one contender from
    always running first (just after another's memory was freed, say).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            started = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def command_line() -> str:
    """The command that ran this benchmark, as one would type it from the repo root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd())
    return shlex.join(["python", str(script), *sys.argv[1:]])


def report(
    benchmark: str,
    figures: Mapping[str, Any],
    device: torch.device,
    summary: str,
    *,
    write: bool = True,
) -> None:
    """Print the one JSON line; append a row to this benchmark's table in RESULTS.md.

    Args:
        benchmark: the table's name (``train_step``...).
        figures: everything measured; printed whole.
        device: what ran it.
        summary: the row's figures column, the few numbers a reader compares.
        write: False leaves RESULTS.md alone (a trial run).
    """
    line = {
        "benchmark": benchmark,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(device),
        "command": command_line(),
        **figures,
    }
    print(json.dumps(line, default=_plain), flush=True)
    if write:
        row = f"| {line['date']} | {line['machine']} | `{line['command']}` | {summary} |"
        append_row(benchmark, row)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"cannot put {type(value).__name__} in the JSON line")


def append_row(benchmark: str, row: str, results: Path = RESULTS) -> None:
    """Add ``row`` at the end of the table between ``<!-- benchmark -->`` markers."""
    start, end = f"<!-- {benchmark} -->", f"<!-- /{benchmark} -->"
    text = results.read_text() if results.exists() else ""
    if start not in text or end not in text:
        header = "| date | machine | command | figures |\n|---|---|---|---|"
        text = f"{text.rstrip()}\n\n## {benchmark}\n\n{start}\n{header}\n{end}\n"
    before, rest = text.split(start, 1)
    table, after = rest.split(end, 1)
    table = table.rstrip("\n") + "\n" + row + "\n"
    results.write_text(before + start + table + end + after)


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def on_own_thread(work: Callable[[], T]) -> T:
    """``work()`` run on a thread of its own that ends with it.

    On CPU, torch's parallel operations keep an OpenMP pool per thread that ran them, for
    as long as that thread lives; two live pools on a machine with as many cores as one
    pool's threads make every operation of both slower (their helpers stop spin-waiting).
    An engine computes on its own step thread, so one-off work (writing adapters, loading
    a peer's model) runs here and its pool goes away with the thread, and a peer that runs
    on the main thread runs once no engine is alive.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as error:  # re-raised on the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="bench-one-off")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def write_random_adapters(base: Path, folders: Sequence[Path], spec: LoraSpec) -> int:
    """A different random adapter (seeded by its index) in each folder, PEFT's format.

    B is non-zero, so each one changes the output. One model carries the adapter; its A
    and B get new values before each save. Returns the bytes of one adapter's weights.
    Runs on a thread of its own (:func:`on_own_thread`).
    """
    return on_own_thread(lambda: _write_random_adapters(base, folders, spec))


def _write_random_adapters(base: Path, folders: Sequence[Path], spec: LoraSpec) -> int:
    model = base_models.load_model(base, "cpu")
    apply_lora(model, spec, adapter="bench")
    weights = [
        w
        for _, layer in lora_layers(model)
        for w in (layer.weight_a("bench"), layer.weight_b("bench"))
    ]
    generator = torch.Generator()
    for seed, folder in enumerate(folders):
        generator.manual_seed(seed)
        with torch.no_grad():
            for weight in weights:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        save_adapter(model, folder, adapter="bench", base_model_name_or_path=base.name)
    return sum(w.nbytes for w in weights)
