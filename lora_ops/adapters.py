"""Adapter folders meeting a base model: load one onto a base, or merge it into a new folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops import base_models
from lora_ops.errors import InputError
from lora_ops.files import replace_folder, staging_folder
from lora_ops.lora import load_adapter, merge_adapter, remove_lora, set_adapter

ADAPTER_NAME = "default"  # the name a single loaded adapter goes by (PEFT's too)


def load_adapted(
    base: str | Path, adapter_dir: Path | None, adapter: str = ADAPTER_NAME
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (and tokenizer) with the adapter in ``adapter_dir`` switched on."""
    tokenizer = base_models.load_tokenizer(base)
    model = base_models.load_model(base)
    if adapter_dir is not None:
        load_adapter(model, Path(adapter_dir), adapter)
        set_adapter(model, adapter)
    return model, tokenizer


def merge_to_folder(base: str | Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write a plain transformers model folder with the adapter merged into its weights.

    The folder is built beside ``out_dir`` and renamed into place; an existing non-empty
    ``out_dir`` is refused so nothing is overwritten by accident.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError("already exists and is not empty", file=out_dir, field="--out")
    model, tokenizer = load_adapted(base, adapter_dir)
    merge_adapter(model, "default")
    remove_lora(model)
    staging = staging_folder(out_dir)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_folder(staging, out_dir)  # over an empty folder, checked above
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
