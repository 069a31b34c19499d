"""Resumable training checkpoints: adapter + optimizer + step + RNG, written atomically.

``<dir>/step-<n>/`` holds the adapter in PEFT's format, ``trainer_state.pt`` (optimizer
state and RNG states, tensors and plain values only, read back with
``weights_only=True``) and ``trainer_state.json`` (step and fingerprint). A checkpoint is
built under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the newest whole one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ops.errors import InputError
from lora_ops.files import replace_folder
from lora_ops.lora import load_adapter_weights, save_adapter

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
) -> Path:
    """Write checkpoint ``step-<step>`` and keep only the newest few."""
    final = folder / f"step-{step}"
    staging = folder / f".step-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging, base_model_name_or_path=base_model_name)
    state: dict[str, Any] = {
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "python_rng": _python_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, staging / STATE_PT)
    (staging / STATE_JSON).write_text(
        json.dumps({"step": step, "fingerprint": run_fingerprint}, indent=2) + "\n"
    )
    replace_folder(staging, final)
    for old in complete_checkpoints(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run_fingerprint: str
) -> int:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the step it was taken at.

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
    torch.random.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_python_rng_from(state["python_rng"]))
    return int(meta["step"])


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
