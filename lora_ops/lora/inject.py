"""Put adapters into a model and take them out: target matching, freezing, routing, merge."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lora_ops.errors import InputError
from lora_ops.lora.layer import QUANTIZED_MERGE, LoRALinear, RowGroup
from lora_ops.lora.spec import LoraSpec
from lora_ops.lora.targets import is_linear, linear_shape, model_type_of, resolve_targets


@dataclass(frozen=True)
class TrainableReport:
    """How much of the model an adapter trains."""

    trainable: int
    total: int
    modules: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable: {self.percent:.4f}% || {len(self.modules)} LoRA modules"
        )


def matches_target(module_name: str, target: str) -> bool:
    """PEFT's rule: a target matches a module whose name is it or ends with '.' + it."""
    return module_name == target or module_name.endswith("." + target)


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear layers (``nn.Linear`` or ``Conv1D``) that ``targets`` pick out,
    in model order.

    Raises:
        InputError: a target matches nothing, or matches a module that is not linear.
    """
    linear: list[str] = []
    for name, module in model.named_modules():
        if (isinstance(module, LoRALinear) or is_linear(module)) and not _is_inside_lora(name):
            linear.append(name)
    problems = []
    for target in targets:
        hits = [name for name in linear if matches_target(name, target)]
        if hits:
            continue
        others = [
            type(m).__name__ for n, m in model.named_modules() if n and matches_target(n, target)
        ]
        if others:
            problems.append(f"{target!r} matches {others[0]} modules, not linear layers")
        else:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            kind = model_type_of(model) or type(model).__name__
            problems.append(
                f"{target!r} matches no module; the linear layers of this {kind} model "
                f"end in: {', '.join(suffixes)}"
            )
    if problems:
        raise InputError("; ".join(problems), field="target_modules")
    return [name for name in linear if any(matches_target(name, t) for t in targets)]


def _is_inside_lora(name: str) -> bool:
    # The wrapped base and the adapters' own nn.Linear are never targets themselves.
    return ".base_layer" in name or ".lora_A." in name or ".lora_B." in name


def add_adapter_to_modules(
    model: nn.Module,
    module_names: Sequence[str],
    adapter: str,
    spec: LoraSpec,
    *,
    initialise: bool = True,
) -> None:
    """Wrap each named linear layer in a LoRALinear (once) and add adapter ``adapter`` to it.

    ``initialise=False`` leaves A and B uninitialised, for a caller that fills them next.
    """
    for name in module_names:
        module = model.get_submodule(name)
        if is_linear(module):
            module = LoRALinear(module)
            _replace_module(model, name, module)
        if not isinstance(module, LoRALinear):
            raise InputError(f"{name} is {type(module).__name__}, not a linear layer", field=name)
        module.add_adapter(adapter, spec, initialise=initialise)


def apply_lora(model: nn.Module, spec: LoraSpec, adapter: str = "default") -> TrainableReport:
    """Add adapter ``adapter`` to every target module and leave only its A and B trainable.

    A spec without targets gets the architecture's defaults, and ``all-linear`` the names
    of every linear layer but the head (see ``lora.targets``); the layers keep that spec,
    so a saved adapter names its modules.

    Returns:
        The trainable-parameter report (count and percent of the whole model).
    """
    spec = resolve_targets(model, spec)
    names = check_spec_fits(model, spec)
    if any(adapter in layer.specs for _, layer in lora_layers(model)):
        raise InputError(f"the model already has an adapter named {adapter!r}", field="adapter")
    add_adapter_to_modules(model, names, adapter, spec)
    mark_trainable(model, adapter)
    set_adapter(model, adapter)
    return trainable_report(model)


def check_spec_fits(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The modules ``spec`` targets in ``model``; refuses targets that match no linear layer
    and a rank above a target's smaller side. Works on a model on the meta device.

    Raises:
        InputError: naming the field (``target_modules`` or ``r``) and the layer.
    """
    names = find_target_modules(model, resolve_targets(model, spec).target_modules)
    _check_rank_fits(model, names, spec.r)
    return names


def _check_rank_fits(model: nn.Module, module_names: Sequence[str], r: int) -> None:
    """Refuse a rank above a target's smaller side: B·A cannot exceed rank min(d_in, d_out),
    so the extra rows are parameters that train nothing."""
    for name in module_names:
        module = model.get_submodule(name)
        d_out, d_in = linear_shape(module.base_layer if isinstance(module, LoRALinear) else module)
        if r > min(d_in, d_out):
            raise InputError(
                f"{r} is larger than {name}'s smaller side ({d_out} x {d_in}); "
                f"use r <= {min(d_in, d_out)}",
                field="r",
            )


def mark_trainable(model: nn.Module, adapter: str) -> None:
    """Freeze everything but adapter ``adapter``'s A and B."""
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter in layer.specs:
            layer.lora_A[adapter].requires_grad_(True)
            layer.lora_B[adapter].requires_grad_(True)


def trainable_report(model: nn.Module) -> TrainableReport:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    modules = tuple(name for name, _ in lora_layers(model))
    return TrainableReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        modules=modules,
    )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in model order, without walking into them.

    ``named_modules`` would visit each adapter's own A, B and dropout modules too: with
    64 adapters resident that is ~24,000 modules and ~50 ms per walk, paid on every load.
    """
    if isinstance(model, LoRALinear):
        yield "", model
        return
    yield from _lora_layers_below(model, "")


def _lora_layers_below(module: nn.Module, prefix: str) -> Iterator[tuple[str, LoRALinear]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, LoRALinear):
            yield path, child
        else:
            yield from _lora_layers_below(child, path)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def set_adapter(model: nn.Module, adapter: str | None) -> None:
    """Route every row through ``adapter`` (None: the base model alone)."""
    if adapter is not None and adapter not in adapter_names(model):
        raise InputError(f"no adapter named {adapter!r} on the model", field="adapter")
    for _, layer in lora_layers(model):
        layer.row_groups = None
        layer.active = adapter if adapter in layer.specs else None


def set_row_adapters(model: nn.Module, per_row: Sequence[str | None]) -> None:
    """Route batch row i through ``per_row[i]`` (None: that row uses the base alone)."""
    known = set(adapter_names(model))
    unknown = sorted({a for a in per_row if a is not None and a not in known})
    if unknown:
        raise InputError(f"no adapter named {', '.join(map(repr, unknown))}", field="adapter")
    device = next(model.parameters()).device
    rows_by_adapter: dict[str, list[int]] = {}
    for row, adapter in enumerate(per_row):
        if adapter is not None:
            rows_by_adapter.setdefault(adapter, []).append(row)
    groups = [
        RowGroup(adapter, torch.tensor(rows, dtype=torch.long, device=device))
        for adapter, rows in rows_by_adapter.items()
    ]
    for _, layer in lora_layers(model):
        layer.active = None
        layer.row_groups = [g for g in groups if g.adapter in layer.specs]


@contextmanager
def adapters_in_use(model: nn.Module, per_row: str | Sequence[str | None] | None) -> Iterator[None]:
    """Route rows for the length of a ``with`` block, then back to the base model."""
    if per_row is None or isinstance(per_row, str):
        set_adapter(model, per_row)
    else:
        set_row_adapters(model, per_row)
    try:
        yield
    finally:
        set_adapter(model, None)


def merge_adapter(model: nn.Module, adapter: str) -> None:
    """Fold ``adapter`` into the base weights of every layer that has it."""
    layers = [layer for _, layer in lora_layers(model) if adapter in layer.specs]
    if not layers:
        raise InputError(f"no adapter named {adapter!r} on the model", field="adapter")
    if any(layer.quantized for layer in layers):  # before any layer is merged
        raise InputError(QUANTIZED_MERGE, field="adapter")
    for layer in layers:
        layer.merge(adapter)
    set_adapter(model, adapter)


def unmerge_adapter(model: nn.Module, adapter: str) -> None:
    for _, layer in lora_layers(model):
        if adapter in layer.merged:
            layer.unmerge(adapter)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Drop ``adapter`` from every layer; layers left with no adapter become plain again.

    Except layers that hold adapter slots (:mod:`lora_ops.lora.slots`): running requests
    may still decode through the copies in them.
    """
    found = False
    for name, layer in list(lora_layers(model)):
        if adapter in layer.specs:
            found = True
            layer.delete_adapter(adapter)
            if not layer.specs and layer.slot_stacks is None:
                _replace_module(model, name, layer.base_layer)
    if not found:
        raise InputError(f"no adapter named {adapter!r} on the model", field="adapter")


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the plain linear layers back (merged adapters stay in their weights)."""
    for name, layer in list(lora_layers(model)):
        _replace_module(model, name, layer.base_layer)
    return model


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
