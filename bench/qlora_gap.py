"""The logit gap of a QLoRA adapter served on the unquantized base.

``lora-ops train --quantize nf4`` trains an adapter against the base's NF4 weights, but
the fleet serves every adapter on the fp32 base. This measures what that switch costs:
an adapter is trained by ``lora-ops train --quantize nf4`` (a subprocess, timed), then
loaded with lora-ops' own loader onto the NF4 base and onto the fp32 base, and the
next-token logits of both are compared at every labelled (assistant) position of held-out
examples. The two bases alone are compared the same way, the quantization's own gap, for
scale. Figures: max and mean absolute logit difference, mean KL(NF4 || fp32) of the
softmaxes, top-1 agreement, and the held-out loss (token-weighted NLL) of each model.

    python bench/qlora_gap.py [--base smollm2-135m-instruct] [--steps 20] [--examples 16]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import pick_device, report
from transformers import PreTrainedModel

from lora_ops import base_models, data
from lora_ops.config import TrainConfig
from lora_ops.lora import adapters_in_use, load_adapter
from lora_ops.training.batching import IGNORE_INDEX, Tokenized, collate
from lora_ops.training.evaluate import eval_loss
from lora_ops.training.memory import base_dtype_for

BASE = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "examples" / "acme-support.jsonl"
ADAPTER = "default"  # the name load_adapted and the serving cache's single adapter use
BATCH = 4


@dataclass
class Gap:
    """Running totals of how far one model's next-token logits are from another's."""

    positions: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    kl_sum: float = 0.0
    top1_agree: int = 0
    vocab: int = 0

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        """Fold in (positions x vocab) logits: ``reference`` is P in KL(P || Q)."""
        reference, other = reference.double(), other.double()
        difference = (reference - other).abs()
        self.positions += reference.shape[0]
        self.vocab = reference.shape[1]
        self.abs_sum += float(difference.sum())
        self.abs_max = max(self.abs_max, float(difference.max()))
        log_p, log_q = F.log_softmax(reference, dim=-1), F.log_softmax(other, dim=-1)
        self.kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        self.top1_agree += int((reference.argmax(-1) == other.argmax(-1)).sum())

    def figures(self) -> dict[str, float | int]:
        return {
            "positions": self.positions,
            "max_abs_logit_diff": round(self.abs_max, 5),
            "mean_abs_logit_diff": round(self.abs_sum / (self.positions * self.vocab), 6),
            "mean_kl": round(self.kl_sum / self.positions, 6),
            "top1_agreement": round(self.top1_agree / self.positions, 4),
        }


def train_adapter(base: Path, out: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """Train with lora-ops' own command, as a customer's run would; its folder and seconds."""
    executable = Path(sys.executable).with_name("lora-ops")
    command = [
        str(executable),
        "train",
        *("--base", str(base), "--quantize", "nf4", "--data", str(args.data)),
        *("--out", str(out), "--max-steps", str(args.steps), "--lr", str(args.lr)),
        *("--rank", str(args.rank), "--alpha", str(2 * args.rank), "--seed", "0"),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lora-ops train failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), file=sys.stderr, flush=True)
    return Path(done.stdout.strip().splitlines()[-1]), seconds


def labelled_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], adapter: str | None
) -> torch.Tensor:
    """(labelled positions x vocab) next-token logits, fp32, with ``adapter`` on or off."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts label t + 1
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), adapters_in_use(model, adapter):
        logits: torch.Tensor = model(**inputs).logits
    return logits[:, :-1, :][keep].float()


def held_out_loss(
    model: PreTrainedModel, examples: Sequence[Tokenized], pad_id: int, adapter: str | None
) -> float:
    with adapters_in_use(model, adapter):
        return round(eval_loss(model, examples, pad_id, batch_size=BATCH), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="catalogue name or transformers folder")
    parser.add_argument("--steps", type=int, default=20, help="training steps on NF4")
    parser.add_argument("--examples", type=int, default=16, help="held-out examples compared")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is twice it)")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    device = pick_device()
    folder = base_models.resolve_base(args.base)

    with tempfile.TemporaryDirectory(prefix="qlora-gap-") as tmp:
        adapter_dir, train_seconds = train_adapter(folder, Path(tmp) / "adapter", args)

        # The held-out split the training run itself set aside (same file, same settings).
        tokenizer = base_models.load_tokenizer(folder)
        defaults = TrainConfig()
        dataset = data.prepare_dataset(
            args.data,
            tokenizer,
            max_seq_len=defaults.max_seq_len,
            eval_fraction=defaults.eval_fraction,
        )
        examples = dataset.eval[: args.examples]
        pad_id = int(tokenizer.pad_token_id)

        # NF4 as training loaded it (compute dtype from --base-dtype auto); fp32 as served.
        nf4 = base_models.load_model(
            folder, device, dtype=base_dtype_for("auto", device), quantize="nf4"
        )
        fp32 = base_models.load_model(folder, device)
        for model in (nf4, fp32):
            load_adapter(model, adapter_dir, ADAPTER)

    adapted, bases, adapter_effect = Gap(), Gap(), Gap()
    for start in range(0, len(examples), BATCH):
        batch = collate(examples[start : start + BATCH], pad_id, device)
        trained_on = labelled_logits(nf4, batch, ADAPTER)
        served = labelled_logits(fp32, batch, ADAPTER)
        adapted.add(trained_on, served)
        base_nf4 = labelled_logits(nf4, batch, None)
        bases.add(base_nf4, labelled_logits(fp32, batch, None))
        adapter_effect.add(trained_on, base_nf4)

    losses = {
        "adapter_on_nf4": held_out_loss(nf4, examples, pad_id, ADAPTER),
        "adapter_on_fp32": held_out_loss(fp32, examples, pad_id, ADAPTER),
        "base_nf4": held_out_loss(nf4, examples, pad_id, None),
        "base_fp32": held_out_loss(fp32, examples, pad_id, None),
    }
    figures: dict[str, object] = {
        "device": str(device),
        "base": base_models.base_name(folder),
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "learning_rate": args.lr,
        "rank": args.rank,
        "examples": len(examples),
        "adapter_fp32_vs_nf4": adapted.figures(),
        "base_fp32_vs_nf4": bases.figures(),
        "adapter_effect_on_nf4": adapter_effect.figures(),
        "eval_loss": losses,
    }
    for name, value in [*losses.items(), ("kl", adapted.kl_sum), ("kl", bases.kl_sum)]:
        if not math.isfinite(value):
            raise SystemExit(f"{name} is not finite: {value}")
    a, b = adapted.figures(), bases.figures()
    summary = (
        f"adapter fp32 vs NF4 base: max abs logit diff {a['max_abs_logit_diff']:.3f}, "
        f"mean {a['mean_abs_logit_diff']:.4f}, KL {a['mean_kl']:.5f}, "
        f"top-1 {a['top1_agreement']:.3f}; bases alone: max {b['max_abs_logit_diff']:.3f}, "
        f"mean {b['mean_abs_logit_diff']:.4f}, KL {b['mean_kl']:.5f}, "
        f"top-1 {b['top1_agreement']:.3f}; eval loss adapter NF4 {losses['adapter_on_nf4']:.4f}, "
        f"fp32 {losses['adapter_on_fp32']:.4f} (bases NF4 {losses['base_nf4']:.4f}, "
        f"fp32 {losses['base_fp32']:.4f}); {args.steps} steps trained in {train_seconds:.0f} s, "
        f"{len(examples)} examples, {a['positions']} positions"
    )
    report("qlora_gap", figures, device, summary, write=not args.no_write)


if __name__ == "__main__":
    main()
