"""Training and evaluating one adapter: the loop, its batches and checkpoints, held-out
evaluation, the eval gate and the reports people read.

The names below are imported on first use, not with the package: most of them bring
torch (or matplotlib), and ``lora_ops.training.gate`` or a type hint should not have to.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_ops.training.evaluate import Evaluation, eval_loss, evaluate_adapters, perplexity
    from lora_ops.training.gate import GateDecision, decide_gate
    from lora_ops.training.local import train_from_files
    from lora_ops.training.loop import (
        EvalMetrics,
        StepMetrics,
        TrainingHooks,
        TrainingJob,
        TrainResult,
        train_adapter,
    )
    from lora_ops.training.report import gate_markdown, plot_loss_curve
    from lora_ops.training.run_log import MlflowTrainingLog

_HOMES = {
    "Evaluation": "evaluate",
    "eval_loss": "evaluate",
    "evaluate_adapters": "evaluate",
    "perplexity": "evaluate",
    "GateDecision": "gate",
    "decide_gate": "gate",
    "EvalMetrics": "loop",
    "StepMetrics": "loop",
    "TrainingHooks": "loop",
    "TrainingJob": "loop",
    "TrainResult": "loop",
    "train_adapter": "loop",
    "train_from_files": "local",
    "gate_markdown": "report",
    "plot_loss_curve": "report",
    "MlflowTrainingLog": "run_log",
}

__all__ = [
    "EvalMetrics",
    "Evaluation",
    "GateDecision",
    "MlflowTrainingLog",
    "StepMetrics",
    "TrainResult",
    "TrainingHooks",
    "TrainingJob",
    "decide_gate",
    "eval_loss",
    "evaluate_adapters",
    "gate_markdown",
    "perplexity",
    "plot_loss_curve",
    "train_adapter",
    "train_from_files",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
