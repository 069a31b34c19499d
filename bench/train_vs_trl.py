"""`lora-ops train` against TRL's SFTTrainer (+ PEFT), whole processes, on the same training.

Both train SmolLM2 on the same examples (a seeded split of the data file: the held-out
share is never trained on), assistant-only loss, LoRA r/alpha on q, k, v, o, the same
learning rate, batch, steps, warmup and cosine schedule, seed, no dropout, no gradient
checkpointing, fp32 on CPU (see bench/baselines/trl_sft.py for the defaults of TRL's that
are set to match). A third contender, lora-ops with ``--packing``, packs examples into rows
of ``--pack-len`` tokens, as many rows a step as carry about the same tokens as the
unpacked batch, so both see about the same examples in the same steps.

Per contender, each run a fresh process, contenders alternating round by round:
- whole-process wall time (start to exit, model load and data preparation included);
- training tokens/s over its own training loop (input tokens of the examples trained on,
  the same count on both sides);
- peak RSS of the process;
- held-out loss after training, measured here by one evaluator for every adapter: the base
  with the adapter loaded by PEFT, token-weighted NLL over the held-out examples' assistant
  tokens (lora-ops' tokenization and masking).

Targets: process time lora-ops/TRL <= 0.60, tokens/s lora-ops/TRL >= 1.2, held-out loss
lora-ops/TRL <= 1.00; packed/unpacked tokens/s >= 1.3 with held-out loss within 2%.

    python bench/train_vs_trl.py [--steps 30] [--batch 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import median, pick_device, ratio, report

from lora_ops import base_models, data
from lora_ops.training.evaluate import eval_loss

HERE = Path(__file__).resolve().parent
TARGETS = "q_proj,k_proj,v_proj,o_proj"
CONTENDERS = ("lora-ops", "trl", "lora-ops-packed")


def split(source: Path, heldout: int, seed: int, folder: Path) -> tuple[Path, Path]:
    """A seeded split of the data file into train and held-out files."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    if not 0 < heldout < len(lines):
        raise SystemExit(f"--heldout must be between 1 and {len(lines) - 1}, got {heldout}")
    train, held = folder / "train.jsonl", folder / "heldout.jsonl"
    train.write_text("\n".join(lines[heldout:]) + "\n")
    held.write_text("\n".join(lines[:heldout]) + "\n")
    return train, held


def command(contender: str, args: argparse.Namespace, train: Path, held: Path, out: Path,
            packed_batch: int) -> list[str]:  # fmt: skip
    if contender == "trl":
        return [
            sys.executable, str(HERE / "baselines" / "trl_sft.py"), "--base", args.base,
            "--data", str(train), "--out", str(out), "--steps", str(args.steps),
            "--batch", str(args.batch), "--lr", str(args.lr), "--rank", str(args.rank),
            "--seed", str(args.seed), "--max-seq-len", str(args.max_seq_len),
        ]  # fmt: skip
    packing = contender == "lora-ops-packed"
    return [
        str(Path(sys.executable).with_name("lora-ops")), "train", "--base", args.base,
        "--data", str(train), "--validation-data", str(held), "--out", str(out),
        "--max-steps", str(args.steps), "--lr", str(args.lr), "--rank", str(args.rank),
        "--alpha", str(2 * args.rank), "--target-modules", TARGETS, "--seed", str(args.seed),
        "--batch-size", str(packed_batch if packing else args.batch),
        "--max-seq-len", str(args.pack_len if packing else args.max_seq_len),
        "--packing" if packing else "--no-packing",
        # A data cache of its own: every run tokenizes its data, as TRL's does each time.
        "--data-cache", str(out.with_name(f"{out.name}-data")),
    ]  # fmt: skip


def run(argv: list[str], logs: Path) -> dict[str, Any]:
    """Run one whole process: its wall time, peak RSS and what it printed."""
    stdout, stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
    started = time.perf_counter()
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        # wait4 gives this child's own rusage: its RSS high-water mark, not the bench's.
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = stderr.read_text()[-3000:]
        raise SystemExit(f"{' '.join(argv[:3])} failed ({process.returncode}):\n{tail}")
    return {
        "process_seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "stdout": stdout.read_text(),
    }


def trained(contender: str, out: Path, stdout: str) -> dict[str, float]:
    """The contender's own training figures: its loop's tokens/s and seconds."""
    if contender == "trl":
        line = json.loads(stdout.strip().splitlines()[-1])
        return {"tokens_per_second": line["tokens_per_second"], "steps": line["steps"]}
    summary = json.loads((out / "training_summary.json").read_text())
    return {"tokens_per_second": summary["tokens_per_second"], "steps": summary["steps"]}


def heldout_losses(base: str, train: Path, held: Path, adapters: dict[str, Path],
                   max_seq_len: int, device: torch.device) -> dict[str, float]:  # fmt: skip
    """Every adapter's held-out loss, by one evaluator: PEFT loads it onto the base."""
    from peft import PeftModel

    folder = base_models.resolve_base(base)
    tokenizer = base_models.load_tokenizer(folder)
    examples = data.prepare_dataset(
        train, tokenizer, max_seq_len=max_seq_len, validation_path=held
    ).eval
    pad_id = int(tokenizer.pad_token_id)
    losses = {}
    for name, adapter in adapters.items():
        model = PeftModel.from_pretrained(base_models.load_model(folder, device), str(adapter))
        losses[name] = eval_loss(model, examples, pad_id)
        del model
    return losses


def mean_example_tokens(base: str, train: Path, max_seq_len: int) -> float:
    tokenizer = base_models.load_tokenizer(base_models.resolve_base(base))
    dataset = data.prepare_dataset(train, tokenizer, max_seq_len=max_seq_len)
    rows = [*dataset.train, *dataset.eval]
    return sum(len(row.input_ids) for row in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=HERE.parent / "examples/acme-support.jsonl")
    parser.add_argument("--heldout", type=int, default=40, help="Examples held out.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--pack-len", type=int, default=256, help="Packed rows' tokens.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--no-write", action="store_true", help="Leave RESULTS.md alone.")
    args = parser.parse_args()
    contenders = [c for c in args.contenders.split(",") if c]
    if unknown := set(contenders) - set(CONTENDERS):
        raise SystemExit(f"unknown contenders {sorted(unknown)}; pick from {CONTENDERS}")
    device = pick_device()
    with tempfile.TemporaryDirectory(prefix="train-vs-trl-") as tmp:
        folder = Path(tmp)
        train, held = split(args.data, args.heldout, args.seed, folder)
        per_row = args.pack_len / mean_example_tokens(args.base, train, args.max_seq_len)
        packed_batch = max(1, round(args.batch / per_row))
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        for round_no in range(args.rounds):
            # Alternate the order too, so no contender always runs on a warmer machine.
            order = contenders if round_no % 2 == 0 else contenders[::-1]
            for contender in order:
                out = folder / f"{contender}-{round_no}"
                argv = command(contender, args, train, held, out, packed_batch)
                done = run(argv, folder / f"{contender}-{round_no}.log")
                done |= trained(contender, out, done.pop("stdout"))
                done["adapter"] = out
                runs[contender].append(done)
                print(f"{contender} round {round_no}: {done['process_seconds']:.1f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
        adapters = {c: runs[c][-1]["adapter"] for c in contenders}
        losses = heldout_losses(args.base, train, held, adapters, args.max_seq_len, device)
    figures = summarize(runs, losses, args, packed_batch)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in figures["ratios"].items())
    report("train_vs_trl", figures, device, summary, write=not args.no_write)


def summarize(runs: dict[str, list[dict[str, Any]]], losses: dict[str, float],
              args: argparse.Namespace, packed_batch: int) -> dict[str, Any]:  # fmt: skip
    figures: dict[str, Any] = {
        "steps": args.steps, "batch": args.batch, "rank": args.rank, "lr": args.lr,
        "rounds": args.rounds, "packed_batch_rows": packed_batch, "pack_len": args.pack_len,
    }  # fmt: skip
    for contender, done in runs.items():
        figures[contender] = {
            "process_seconds": median([d["process_seconds"] for d in done]),
            "tokens_per_second": median([d["tokens_per_second"] for d in done]),
            "peak_rss_mb": median([d["peak_rss_mb"] for d in done]),
            "steps": done[-1]["steps"],
            "heldout_loss": losses[contender],
        }
    ratios: dict[str, float] = {}
    pairs = {
        "lora-ops/trl": ("lora-ops", "trl"),
        "packed/unpacked": ("lora-ops-packed", "lora-ops"),
    }
    for label, (mine, theirs) in pairs.items():
        if mine in figures and theirs in figures:
            a, b = figures[mine], figures[theirs]
            ratios[f"process {label}"] = ratio(a["process_seconds"], b["process_seconds"])
            ratios[f"tokens/s {label}"] = ratio(a["tokens_per_second"], b["tokens_per_second"])
            ratios[f"heldout {label}"] = ratio(a["heldout_loss"], b["heldout_loss"])
            ratios[f"rss {label}"] = ratio(a["peak_rss_mb"], b["peak_rss_mb"])
    figures["ratios"] = ratios
    return figures


if __name__ == "__main__":
    main()
