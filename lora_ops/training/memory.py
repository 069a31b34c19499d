"""What lets a bigger base fit: its weights' dtype, 4-bit loading, gradient checkpointing.

LoRA trains a few million parameters beside a frozen base, so the base's weights and the
activations kept for the backward pass are most of a run's memory. ``base_dtype`` halves
the first (bf16), ``quantize="nf4"`` quarters it again (QLoRA), and
``gradient_checkpointing`` trades the second for recomputing each decoder layer's forward
in the backward pass. The adapter's A and B, and AdamW's state, stay fp32 whatever the
base: updates of a 2e-4 learning rate vanish in bf16's 8-bit mantissa.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lora_ops import base_models
from lora_ops.config import TrainConfig
from lora_ops.errors import InputError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_dtype_for(choice: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``"auto"`` is bf16 on CUDA, fp32 elsewhere.

    On CUDA the matmuls already run in bf16 under autocast, so bf16 weights cost no accuracy
    there and halve the memory; on a CPU bf16 is slower than fp32 and less exact.
    """
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[choice]


def load_training_base(
    name_or_path: str | Path, config: TrainConfig, device: torch.device | str | None = None
) -> PreTrainedModel:
    """The base model as ``config`` asks to train on it: its dtype, quantized or not."""
    target = torch.device(device) if device else base_models.default_device()
    dtype = base_dtype_for(config.base_dtype, target)
    model = base_models.load_model(name_or_path, target, dtype=dtype, quantize=config.quantize)
    log.info("base on %s in %s, quantized: %s", target, dtype, config.quantize or "no")
    return model


@contextmanager
def gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass while inside.

    Non-reentrant checkpointing: the reentrant kind passes gradients only to inputs that
    require them, and with a frozen base the embeddings' output does not, so the adapters
    would get none. It replays the RNG state too, so dropout draws the same masks.

    Raises:
        InputError: the model's class cannot checkpoint.
    """
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(
            f"{type(model).__name__} does not support gradient checkpointing",
            field="gradient_checkpointing",
        )
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed gradient_ to activation_checkpointing (the old names warn).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
