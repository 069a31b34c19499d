"""What people look at after a run: the loss-curve picture and the Markdown summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers
from matplotlib import pyplot as plt  # noqa: E402

from lora_ops.training.gate import GateDecision  # noqa: E402


def plot_loss_curve(
    train_losses: Sequence[float],
    path: Path,
    *,
    base_eval_loss: float | None = None,
    eval_loss: float | None = None,
    title: str = "training loss",
) -> Path:
    """Save a PNG of the per-step train loss, with the held-out losses as reference lines."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(range(1, len(train_losses) + 1), train_losses, label="train loss (per step)")
        if base_eval_loss is not None:
            ax.axhline(base_eval_loss, color="grey", linestyle="--", label="base eval loss")
        if eval_loss is not None:
            ax.axhline(eval_loss, color="green", linestyle="--", label="adapted eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def gate_markdown(
    customer: str,
    gate: GateDecision,
    generations: Sequence[dict[str, str]],
    *,
    run_url: str | None = None,
    version: str | None = None,
) -> str:
    """A Markdown summary of one evaluation: figures, the gate's verdict, sample replies."""
    verdict = "passed" if gate.passed else "failed"
    production = "-" if gate.production_loss is None else f"{gate.production_loss:.4f}"
    lines = [
        f"# {customer}: gate {verdict}",
        "",
        gate.reason + ".",
        "",
        "| model | eval loss |",
        "|---|---|",
        f"| base | {gate.base_loss:.4f} |",
        f"| candidate | {gate.candidate_loss:.4f} |",
        f"| production | {production} |",
        "",
        f"Relative improvement over the base: {gate.improvement:.1%} "
        f"(needed {gate.min_improvement:.1%}).",
    ]
    if version:
        lines += ["", f"Registered version: {version}"]
    if run_url:
        lines += ["", f"MLflow run: {run_url}"]
    if generations:
        lines += ["", "## Sample replies", "", "| prompt | base | candidate |", "|---|---|---|"]
        for row in generations:
            cells = [_cell(row["prompt"]), _cell(row["base"]), _cell(row["candidate"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
