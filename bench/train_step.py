"""One training step on SmolLM2: lora-ops' LoRA (with and without gradient checkpointing) vs
PEFT's LoRA vs full fine-tuning.

Every contender runs the same step: the loss lora-ops trains with (next-token NLL over
every labelled position), backward, AdamW; batch 4 x 256 tokens, LoRA r=16 alpha=32 on
q, k, v, o without dropout. Each measurement is a fresh process (so peak memory is the
contender's own), and the processes alternate round by round; step time and peak memory
are medians over rounds. Peak memory is the peak above what the process held once the
model was ready (RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA); the whole
process's peak is reported too.

Targets: lora-ops/PEFT step time <= 0.95 and peak memory <= 1.00; LoRA/full step time
<= 0.75, LoRA peak memory well under full fine-tuning's; with gradient checkpointing
(``lora-ops-ckpt``, what ``--gradient-checkpointing`` does) peak memory <= 0.60 of without
at batch 8 x 256.

    python bench/train_step.py [--rounds 3] [--steps 3] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path

import torch
from common import current_rss_bytes, median, pick_device, ratio, report, sync

from lora_ops import base_models

BASE = "smollm2-135m-instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SYSTEMS = ("lora-ops", "lora-ops-ckpt", "peft", "full")


def build(
    system: str, device: torch.device, rank: int, base: str
) -> tuple[torch.nn.Module, AbstractContextManager[None]]:
    """The model to train and the context its steps run in."""
    model = base_models.load_model(base_models.resolve_base(base), device)
    if system in ("lora-ops", "lora-ops-ckpt"):
        from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora
        from lora_ops.training.memory import gradient_checkpointing

        apply_lora(model, LoraSpec(r=rank, alpha=2 * rank, target_modules=TARGETS))
        routing = ExitStack()
        routing.enter_context(adapters_in_use(model, "default"))
        routing.enter_context(gradient_checkpointing(model, system == "lora-ops-ckpt"))
        return model, routing
    if system == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0
        )
        # The wrapped transformers model, whose linear layers now hold PEFT's LoRA.
        return get_peft_model(model, config).base_model.model, nullcontext()
    if system == "full":
        model.requires_grad_(True)
        return model, nullcontext()
    raise SystemExit(f"unknown system {system!r}; pick from {', '.join(SYSTEMS)}")


def reset_peak(device: torch.device) -> int:
    """Start a fresh peak-memory window; returns what is held now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the RSS high-water mark
    return current_rss_bytes()


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(system: str, device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    """Run warm-up and timed steps of one contender in this process."""
    from lora_ops.base_models import autocast_for
    from lora_ops.training.batching import summed_nll

    torch.manual_seed(0)
    model, routing = build(system, device, args.rank, args.base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }
    tokens = args.batch * (args.seq - 1)
    held = reset_peak(device)
    times = []
    with routing:
        for step in range(args.warmup + args.steps):
            sync(device)
            started = time.perf_counter()
            with autocast_for(device):
                loss = summed_nll(model, batch) / tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    top = peak(device)
    return {
        "system": system,
        "step_seconds": times,
        "held_bytes": held,
        "peak_bytes": top,
        "training_peak_bytes": max(0, top - held),
        "trainable_parameters": sum(p.numel() for p in params),
    }


def run_worker(system: str, args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        system,
        *("--device", str(args.device), "--rank", str(args.rank), "--base", args.base),
        *("--batch", str(args.batch), "--seq", str(args.seq)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{system} failed:\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device(args.device)
    args.device = str(device)
    args.base = str(base_models.resolve_base(args.base))  # once, before the workers start
    if args.worker:
        print(json.dumps(measure(args.worker, device, args)), flush=True)
        return

    runs: dict[str, list[dict[str, object]]] = {s: [] for s in SYSTEMS}
    for round_ in range(args.rounds):
        shift = round_ % len(SYSTEMS)
        for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
            runs[system].append(run_worker(system, args))
            print(f"round {round_ + 1}/{args.rounds} {system} done", file=sys.stderr, flush=True)

    tokens = args.batch * args.seq
    figures: dict[str, object] = {
        "device": str(device),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
    }
    step_s, memory = {}, {}
    for system, results in runs.items():
        # The median step of each process, then the median over the alternating rounds.
        step_s[system] = median([median(r["step_seconds"]) for r in results])  # type: ignore[arg-type]
        memory[system] = median([r["training_peak_bytes"] for r in results])  # type: ignore[misc]
        figures[system] = {
            "step_seconds": round(step_s[system], 3),
            "tokens_per_second": round(tokens / step_s[system], 1),
            "training_peak_mb": round(memory[system] / 2**20, 1),
            "process_peak_mb": round(median([r["peak_bytes"] for r in results]) / 2**20, 1),  # type: ignore[misc]
            "trainable_parameters": results[0]["trainable_parameters"],
        }
    ratios = {
        "step lora-ops/peft": ratio(step_s["lora-ops"], step_s["peft"]),
        "memory lora-ops/peft": ratio(memory["lora-ops"], memory["peft"]),
        "step lora-ops/full": ratio(step_s["lora-ops"], step_s["full"]),
        "memory lora-ops/full": ratio(memory["lora-ops"], memory["full"]),
        "memory checkpointed/not": ratio(memory["lora-ops-ckpt"], memory["lora-ops"]),
        "step checkpointed/not": ratio(step_s["lora-ops-ckpt"], step_s["lora-ops"]),
    }
    figures["ratios"] = ratios
    figures["targets_met"] = {
        "step lora-ops/peft <= 0.95": ratios["step lora-ops/peft"] <= 0.95,
        "memory lora-ops/peft <= 1.00": ratios["memory lora-ops/peft"] <= 1.0,
        "step lora-ops/full <= 0.75": ratios["step lora-ops/full"] <= 0.75,
        "memory checkpointed/not <= 0.60": ratios["memory checkpointed/not"] <= 0.60,
    }
    summary = ", ".join(f"{k} {v}" for k, v in ratios.items())
    summary += "; step s " + ", ".join(f"{s} {step_s[s]:.2f}" for s in SYSTEMS)
    summary += "; training peak MB " + ", ".join(f"{s} {memory[s] / 2**20:.0f}" for s in SYSTEMS)
    report("train_step", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
