"""The LoRA core: layer, injection, routing, merge and PEFT-format files (torch only)."""

from lora_ops.lora.inject import (
    TrainableReport,
    adapter_names,
    adapters_in_use,
    apply_lora,
    check_spec_fits,
    delete_adapter,
    find_target_modules,
    lora_layers,
    mark_trainable,
    merge_adapter,
    remove_lora,
    set_adapter,
    set_row_adapters,
    trainable_report,
    unmerge_adapter,
)
from lora_ops.lora.layer import LoRALinear
from lora_ops.lora.peft_format import (
    adapter_config,
    adapter_tensors,
    load_adapter,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from lora_ops.lora.spec import ALL_LINEAR, DEFAULT_TARGETS, LoraSpec
from lora_ops.lora.targets import (
    ARCHITECTURE_TARGETS,
    default_targets,
    resolve_targets,
    with_default_targets,
)

__all__ = [
    "ALL_LINEAR",
    "ARCHITECTURE_TARGETS",
    "DEFAULT_TARGETS",
    "LoRALinear",
    "LoraSpec",
    "TrainableReport",
    "adapter_config",
    "adapter_names",
    "adapter_tensors",
    "adapters_in_use",
    "apply_lora",
    "check_spec_fits",
    "default_targets",
    "delete_adapter",
    "find_target_modules",
    "load_adapter",
    "load_adapter_weights",
    "lora_layers",
    "mark_trainable",
    "merge_adapter",
    "read_adapter_config",
    "remove_lora",
    "resolve_targets",
    "save_adapter",
    "set_adapter",
    "set_row_adapters",
    "trainable_report",
    "unmerge_adapter",
    "with_default_targets",
]
