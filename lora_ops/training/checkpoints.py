"""Resumable training checkpoints: adapter + optimizer + step + RNG, written atomically.

``<dir>/step-<n>/`` holds the adapter in PEFT's format, ``trainer_state.pt`` (optimizer
state and RNG states, tensors and plain values only, read back with
``weights_only=True``; under data parallelism every rank's RNG states, as each rank draws
its own dropout masks) and ``trainer_state.json`` (step and fingerprint). A checkpoint is
built under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the newest whole one.

``BestWeights`` is checkpoint selection: the held-out evaluations so far and a copy of the
adapter weights that scored best. Its state travels in ``trainer_state.pt``, so a resumed
run still ends on the best weights of the whole run, not of its last attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ops.errors import InputError
from lora_ops.files import replace_folder
from lora_ops.lora import load_adapter_weights, save_adapter

log = logging.getLogger(__name__)

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
KEEP = 2


def fingerprint(*parts: str) -> str:
    """A short hash of what a checkpoint belongs to (config, data, base)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def complete_checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.glob("step-*")
        if p.is_dir() and _step_of(p) >= 0 and (p / STATE_JSON).is_file()
    ]
    return sorted(found, key=_step_of)


def latest(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def save(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_fingerprint: str,
    base_model_name: str = "",
    selection: dict[str, Any] | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step-<step>`` and keep only the newest few.

    ``selection`` is ``BestWeights.state()``, kept with the optimizer state; ``rank_rng``
    is every data-parallel rank's ``rng_state()``, in rank order.
    """
    final = folder / f"step-{step}"
    staging = folder / f".step-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging, base_model_name_or_path=base_model_name)
    state: dict[str, Any] = {"optimizer": optimizer.state_dict(), **rng_state()}
    if selection is not None:
        state["selection"] = selection
    if rank_rng is not None:
        state["rank_rng"] = rank_rng
    torch.save(state, staging / STATE_PT)
    (staging / STATE_JSON).write_text(
        json.dumps({"step": step, "fingerprint": run_fingerprint}, indent=2) + "\n"
    )
    replace_folder(staging, final)
    for old in complete_checkpoints(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """This process's random number generators, as a checkpoint keeps them."""
    state: dict[str, Any] = {
        "torch_rng": torch.random.get_rng_state(),
        "python_rng": _python_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_fingerprint: str,
    rank: int = 0,
) -> int:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the step it was taken at.

    ``rank`` takes its own RNG states when the checkpoint holds each rank's; otherwise
    (a single-process checkpoint, or more ranks now than then) rank 0's.

    Raises:
        InputError: the checkpoint belongs to another config, dataset or base model.
    """
    meta = json.loads((path / STATE_JSON).read_text())
    if meta.get("fingerprint") != run_fingerprint:
        raise InputError(
            "checkpoint was made with another config, dataset or base model; "
            "remove the checkpoint folder or train without --resume",
            file=path,
        )
    load_adapter_weights(model, path)
    state = torch.load(path / STATE_PT, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    per_rank = state.get("rank_rng") or []
    _set_rng_state(per_rank[rank] if rank < len(per_rank) else state)
    return int(meta["step"])


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_python_rng_from(state["python_rng"]))


def resume(
    folder: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_fingerprint: str,
    patience: int | None,
    rank: int = 0,
) -> tuple[int, BestWeights]:
    """Restore the newest checkpoint in ``folder`` (None: start afresh) as ``rank`` resumes.

    Returns:
        The step to go on from, and the evaluations so far with the best weights.

    Raises:
        InputError: the checkpoint belongs to another config, dataset or base model.
    """
    if folder is None or (newest := latest(folder)) is None:
        return 0, BestWeights(patience)
    step = restore(newest, model, optimizer, run_fingerprint, rank)
    log.info("resumed from %s (step %d)", newest, step)
    selection = torch.load(newest / STATE_PT, weights_only=True).get("selection")
    if not isinstance(selection, dict):  # written before checkpoints carried one
        return step, BestWeights(patience)
    return step, BestWeights.from_state(selection, patience)


@dataclass
class BestWeights:
    """Held-out evaluations of one run and the adapter weights that scored best.

    Attributes:
        patience: evaluations without improvement after which the run should stop;
            None never stops it.
        history: (step, held-out loss) of every evaluation, in order.
        best_step: the step whose weights scored lowest; None before any evaluation.
        best_loss: that step's held-out loss.
        stale: evaluations since the best one.
        weights: the trainable tensors at ``best_step``, on the CPU.
    """

    patience: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float = math.inf
    stale: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, step: int, loss: float, model: nn.Module) -> bool:
        """Note step ``step``'s held-out loss; keep its weights if it is the best so far.

        Only a strictly lower loss counts as an improvement (a NaN never does), so a
        plateau uses up patience and the earliest of equal scores is kept.
        """
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.stale = step, loss, 0
            self.weights = {
                name: p.detach().to("cpu", copy=True)
                for name, p in model.named_parameters()
                if p.requires_grad
            }
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Patience is used up: the run should stop."""
        return self.patience is not None and self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Put the best weights back into ``model`` (nothing to do before any evaluation)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.weights.items():
                params[name].copy_(tensor)

    def state(self) -> dict[str, Any]:
        """Plain values and tensors only, for ``torch.load(weights_only=True)``."""
        return {
            "history": [[step, loss] for step, loss in self.history],
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "stale": self.stale,
            "weights": self.weights,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], patience: int | None) -> BestWeights:
        return cls(
            patience=patience,
            history=[(int(step), float(loss)) for step, loss in state["history"]],
            best_step=state["best_step"],
            best_loss=float(state["best_loss"]),
            stale=int(state["stale"]),
            weights=dict(state["weights"]),
        )


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
