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
from lora_ops.lora.spec import DEFAULT_TARGETS, LoraSpec

__all__ = [
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
    "delete_adapter",
    "find_target_modules",
    "load_adapter",
    "load_adapter_weights",
    "lora_layers",
    "mark_trainable",
    "merge_adapter",
    "read_adapter_config",
    "remove_lora",
    "save_adapter",
    "set_adapter",
    "set_row_adapters",
    "trainable_report",
    "unmerge_adapter",
]
