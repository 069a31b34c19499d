"""Which layers of a model an adapter targets: defaults per architecture, ``all-linear``.

PEFT looks the default targets up by the model's ``config.model_type``
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) and we do the same, with one
difference of taste: PEFT's table names only the query and value projections (the LoRA
paper's choice), ours names every attention projection, as lora-ops has always trained
q/k/v/o on llama. Fused projections (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``,
GPT-2's ``c_attn``) are ordinary linear layers with one A/B pair over the fused output, as
in PEFT. ``all-linear`` is PEFT's shorthand: every linear layer but the output head.

transformers' ``Conv1D`` (GPT-2's layers) is told apart by its class name and shape,
because the LoRA core must not import transformers.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from lora_ops.errors import InputError
from lora_ops.lora.spec import ALL_LINEAR, DEFAULT_TARGETS, LoraSpec

_LLAMA_LIKE = DEFAULT_TARGETS
# model_type -> attention projections (module-name suffixes). A dotted suffix keeps an
# attention projection apart from an MLP layer of the same short name (GPT-2's c_proj).
ARCHITECTURE_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "starcoder2",
            "stablelm",
        ),
        _LLAMA_LIKE,
    ),
    "phi3": ("qkv_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "self_attn.dense"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "gpt2": ("c_attn", "attn.c_proj"),
    "gpt_bigcode": ("c_attn", "attn.c_proj"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is stored (d_in, d_out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an ``nn.Linear`` or a ``Conv1D`` (whose weight is transposed)."""
    if isinstance(module, nn.Linear):
        # Read from the layer, not its weight: a 4-bit layer (bitsandbytes' Linear4bit, an
        # nn.Linear) stores its weight packed, two codes a byte, as a (d_out * d_in / 2, 1).
        return module.out_features, module.in_features
    weight = cast(torch.Tensor, module.weight)
    d_a, d_b = weight.shape
    return (d_b, d_a) if is_conv1d(module) else (d_a, d_b)


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model, read without importing it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def default_targets(model_type: str | None) -> tuple[str, ...]:
    """The attention projections of ``model_type``; llama's names for a type not listed
    (the target check then names the model's own layers if they do not fit)."""
    return ARCHITECTURE_TARGETS.get(model_type or "", _LLAMA_LIKE)


def with_default_targets(spec: LoraSpec, model_type: str | None) -> LoraSpec:
    """``spec``, its targets filled in from ``model_type`` when none were given."""
    if spec.target_modules:
        return spec
    return dataclasses.replace(spec, target_modules=default_targets(model_type))


def resolve_targets(model: nn.Module, spec: LoraSpec) -> LoraSpec:
    """``spec`` with concrete module names: the architecture's defaults when none were
    given, and ``all-linear`` replaced by the names of every linear layer but the head.

    What is saved in ``adapter_config.json`` is the result, as PEFT saves its own.
    """
    spec = with_default_targets(spec, model_type_of(model))
    if spec.target_modules != (ALL_LINEAR,):
        return spec
    return dataclasses.replace(spec, target_modules=_all_linear(model))


def _all_linear(model: nn.Module) -> tuple[str, ...]:
    """Suffixes of every linear layer's name but the output head's, or full names where a
    suffix would also pick the head (PEFT saves full names; both select the same layers)."""
    head = _output_head(model)
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if is_linear(module) and ".lora_A." not in name and ".lora_B." not in name:
            # A layer that already holds adapters is found through its base layer.
            names[name.removesuffix(".base_layer")] = None
    names.pop(head_name or "", None)
    if not names:
        raise InputError("no linear layer but the output head", field="target_modules")
    head_suffix = head_name.rsplit(".", 1)[-1] if head_name else None
    suffixes = {name.rsplit(".", 1)[-1] for name in names}
    if head_suffix in suffixes:
        return tuple(sorted(names))
    return tuple(sorted(suffixes))


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None
