"""lora-ops against vLLM: one multi-LoRA workload over HTTP, on one GPU, one server at a time.

Both servers get the same base (a transformers folder: vLLM cannot read the GGUF the
catalogue's SmolLM2 comes from, so a catalogue name is converted as ``lora-ops base
import`` does), the same ``--adapters`` random adapters in PEFT's format, the same batch
limit and context length, and the same requests (chat prompts from the sample data, 70% of
answers 8-32 tokens and 30% 128-256, run to their length; adapters by power-law
popularity), streamed through ``bench/http_load.py``:

1. ``vllm serve BASE --enable-lora --lora-modules name=path ...`` (bf16), then
2. ``lora-ops serve`` (fp32 weights under bf16 autocast), its adapters loaded through
   ``/v1/load_lora_adapter``.

For each: a warm-up (every adapter once, then one round of callers), saturation (``--clients``
callers in a closed loop), then Poisson arrivals at each rate (``--rates``, or
``--load-fractions`` of vLLM's saturated rate, the same rates for both). Reported: tokens
and requests per second, p50/p99 time to first token and end to end, per contender, and
lora-ops/vLLM ratios (throughput above 1 is lora-ops ahead; latency above 1 is lora-ops
behind).

    python bench/gpu/vllm_compare.py [--adapters 8] [--requests 128] [--clients 32]
    python bench/gpu/vllm_compare.py --dry-run   # the commands it would run, nothing else
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import random
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the shared benchmark modules live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import ratio, report, write_random_adapters  # noqa: E402
from http_load import (  # noqa: E402
    ChatRequest,
    HttpRun,
    closed_loop_http,
    free_port,
    lora_ops_replica,
    mixed_length_chats,
    open_loop_http,
    replica_command,
    running_server,
)
from workload import describe, mixed_lengths, sample_messages, zipf_models  # noqa: E402

from lora_ops import base_models  # noqa: E402
from lora_ops.generation import encode_chat  # noqa: E402
from lora_ops.lora import LoraSpec  # noqa: E402

BASE = "smollm2-135m-instruct"
MAX_LORA_RANK = 16  # vLLM sizes its adapter slots by this; our ranks must fit
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LATENCIES = ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s")
# No network on the GPU machines: nothing may try a hub, nor report usage.
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def vllm_executable() -> str:
    """The ``vllm`` script beside this interpreter (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).with_name("vllm")
    if beside.is_file():
        return str(beside)
    return shutil.which("vllm") or "vllm"


def vllm_command(
    base: Path, port: int, adapters: Mapping[str, Path], args: argparse.Namespace
) -> list[str]:
    command = [vllm_executable(), "serve", str(base), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--served-model-name", "base", "--dtype", "bfloat16", "--seed", str(args.seed)]
    command += ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.batch)]
    command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    command += ["--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK)]
    # Every adapter may sit in one batch, as in lora-ops, and all stay in host memory.
    command += ["--max-loras", str(min(len(adapters), args.batch))]
    command += ["--max-cpu-loras", str(len(adapters))]
    command += shlex.split(args.vllm_args)
    # Last: it takes every argument after it.
    return command + ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]


def lora_ops_serve_args(args: argparse.Namespace) -> list[str]:
    # Queue limits well above the run's requests: a 429 would be a refusal vLLM never makes.
    room = str(4 * max(args.requests, args.open_requests))
    return [
        "--max-batch-size",
        str(args.batch),
        "--max-model-len",
        str(args.max_model_len),
        "--max-queue",
        room,
        "--max-requests-per-model",
        room,
    ]


def checked(run: HttpRun, contender: str, what: str) -> HttpRun:
    """``run``, unless a request failed: a figure over the answered ones would flatter."""
    if run.failures:
        shown = "\n  ".join(run.failures[:5])
        raise SystemExit(f"{contender} {what}: {len(run.failures)} requests failed:\n  {shown}")
    return run


def measure(
    contender: str,
    url: str,
    warmup: Sequence[ChatRequest],
    requests: Sequence[ChatRequest],
    args: argparse.Namespace,
    rates: Sequence[float] | None,
) -> dict[str, Any]:
    """Warm-up, saturation, then open loops at ``rates`` (None: fractions of this one's)."""
    checked(closed_loop_http(url, warmup, args.clients), contender, "warm-up")
    saturated = checked(closed_loop_http(url, requests, args.clients), contender, "saturation")
    figures: dict[str, Any] = {"saturated": saturated.figures()}
    if rates is None:
        top = figures["saturated"]["requests_per_second"]
        rates = [round(fraction * top, 3) for fraction in args.load_fractions]
    figures["open"] = {}
    for rate in rates:
        run = open_loop_http(url, requests[: args.open_requests], rate, args.seed)
        figures["open"][f"{rate:g}"] = checked(run, contender, f"at {rate:g} req/s").figures()
    figures["offered_rates"] = list(rates)
    print(f"{contender}: {figures}", file=sys.stderr, flush=True)
    return figures


def ratios_of(lora_ops: dict[str, Any], vllm: dict[str, Any]) -> dict[str, float]:
    ratios = {
        "saturated tokens/s lora-ops/vllm": ratio(
            lora_ops["saturated"]["tokens_per_second"], vllm["saturated"]["tokens_per_second"]
        ),
        "saturated ttft p99 lora-ops/vllm": ratio(
            lora_ops["saturated"]["ttft_p99_s"], vllm["saturated"]["ttft_p99_s"]
        ),
    }
    for rate, ours in lora_ops["open"].items():
        theirs = vllm["open"][rate]
        for latency in LATENCIES:
            label = latency.removesuffix("_s").replace("_", " ")
            ratios[f"{label} at {rate} req/s lora-ops/vllm"] = ratio(ours[latency], theirs[latency])
    return ratios


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help=f"at most {MAX_LORA_RANK}")
    parser.add_argument("--requests", type=int, default=128, help="the saturation run's")
    parser.add_argument("--clients", type=int, default=32, help="callers at saturation")
    parser.add_argument("--batch", type=int, default=32, help="most sequences running, both")
    parser.add_argument("--open-requests", type=int, default=64, help="sent at each rate")
    parser.add_argument(
        "--rates", type=parse_floats, default=None, help="req/s, comma-separated (absolute)"
    )
    parser.add_argument(
        "--load-fractions",
        type=parse_floats,
        default=[0.5, 0.8],
        help="rates as fractions of vLLM's saturated req/s, when --rates is not given",
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--vllm-args", default="", help="more `vllm serve` flags, one string")
    parser.add_argument("--startup-timeout", type=float, default=600, help="per server, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="adapters go here")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (vllm.log...)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    if not 1 <= args.rank <= MAX_LORA_RANK:
        parser.error(f"--rank must be between 1 and {MAX_LORA_RANK} (vLLM's --max-lora-rank)")
    if args.adapters < 1:
        parser.error("--adapters must be at least 1")
    return args


def base_folder(name_or_path: str, dry_run: bool) -> Path:
    """The base as a transformers folder; a catalogue name is converted (once, cached)."""
    if name_or_path in base_models.CATALOGUE:
        if dry_run:  # where `lora-ops base import` puts it, without converting now
            return base_models.catalogue_folder(name_or_path)
        return base_models.import_base(name_or_path)
    if dry_run:
        return Path(name_or_path).expanduser().resolve()
    return base_models.resolve_base(name_or_path)


def dry_run(base: Path, adapters: Mapping[str, Path], root: Path, args: argparse.Namespace) -> None:
    print("# vLLM")
    print(shlex.join(vllm_command(base, free_port(), adapters, args)))
    print("# lora-ops, then POST /v1/load_lora_adapter for each adapter")
    print(shlex.join(replica_command(base, free_port(), root, lora_ops_serve_args(args))))
    for name, path in adapters.items():
        print(f"#   {name}={path}")


def refuse_without_vllm_or_gpu() -> None:
    if importlib.util.find_spec("vllm") is None:
        print(
            "vllm is not installed here: this benchmark needs `pip install vllm` on a GPU "
            "machine (--dry-run prints the commands without it)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: both servers must run on one", file=sys.stderr)
        raise SystemExit(2)


def main() -> None:
    args = parse_args()
    if not args.dry_run:
        refuse_without_vllm_or_gpu()
    base = base_folder(args.base, args.dry_run)
    own_work_dir = args.work_dir is None
    if args.work_dir is None:
        work_dir = Path(tempfile.gettempdir()) / "vllm-compare"
        if not args.dry_run:
            work_dir = Path(tempfile.mkdtemp(prefix="vllm-compare-"))
    else:
        work_dir = args.work_dir.resolve()
    root = work_dir / "adapters"
    adapters = {f"customer-{i:02d}": root / f"customer-{i:02d}" for i in range(args.adapters)}
    if args.dry_run:
        dry_run(base, adapters, root, args)
        return

    log_dir = (args.log_dir or work_dir / "logs").resolve()
    try:
        figures = compare(base, adapters, root, log_dir, args)
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    summary = ", ".join(f"{k} {v}" for k, v in figures["ratios"].items()) + (
        f"; saturated tok/s lora-ops {figures['lora-ops']['saturated']['tokens_per_second']}, "
        f"vllm {figures['vllm']['saturated']['tokens_per_second']}"
    )
    report("vllm_compare", figures, torch.device("cuda"), summary, write=not args.no_write)


def compare(
    base: Path,
    adapters: Mapping[str, Path],
    root: Path,
    log_dir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec = LoraSpec(r=args.rank, alpha=2 * args.rank, target_modules=TARGET_MODULES)
    write_random_adapters(base, list(adapters.values()), spec)
    names = list(adapters)
    models = zipf_models(names, args.requests, random.Random(args.seed))
    requests = mixed_length_chats(models, args.seed)
    tokenizer = base_models.load_tokenizer(base)
    encoded = mixed_lengths(lambda m: encode_chat(tokenizer, m), models, args.seed)
    assert [r.max_tokens for r in encoded] == [r.max_tokens for r in requests]
    first_chat = sample_messages()[0]
    warmup = [ChatRequest(first_chat, name, 8) for name in names] + requests[: args.clients]

    vllm_port = free_port()
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    command = vllm_command(base, vllm_port, adapters, args)
    print(f"starting: {shlex.join(command)}", file=sys.stderr, flush=True)
    with running_server(
        command,
        vllm_url + "/health",
        log_dir / "vllm.log",
        VLLM_ENV,
        args.startup_timeout,
        what="vllm serve",
    ):
        vllm = measure("vllm", vllm_url, warmup, requests, args, args.rates)
    rates = vllm["offered_rates"]  # the same offered loads for lora-ops

    with lora_ops_replica(
        base,
        adapters,
        adapter_root=root,
        serve_args=lora_ops_serve_args(args),
        log=log_dir / "lora-ops.log",
        startup_timeout_s=args.startup_timeout,
    ) as replica:
        ours = measure("lora-ops", replica.url, warmup, requests, args, rates)
        port = int(replica.url.rsplit(":", 1)[1])
        serve = replica_command(base, port, root, lora_ops_serve_args(args))

    return {
        "base": base_models.base_name(base),
        "adapters": len(adapters),
        "rank": args.rank,
        "batch": args.batch,
        "clients": args.clients,
        "vllm_version": importlib.metadata.version("vllm"),
        "workload": describe(encoded),
        "rates": rates,
        "vllm_command": shlex.join(command),
        "lora_ops_command": shlex.join(serve),
        "vllm": vllm,
        "lora-ops": ours,
        "ratios": ratios_of(ours, vllm),
    }


if __name__ == "__main__":
    main()
