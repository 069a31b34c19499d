"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's (``base_model.model.<module path>.lora_A.weight``), so PEFT, vLLM
and LoRAX load our adapters unchanged and we load theirs. Only safetensors are read: a
pickle file is never opened.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import nn

from lora_ops.errors import AdapterMismatchError, InputError
from lora_ops.lora.inject import add_adapter_to_modules, lora_layers, matches_target
from lora_ops.lora.layer import LoRALinear
from lora_ops.lora.spec import LoraSpec
from lora_ops.lora.targets import is_conv1d, is_linear, linear_shape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT features our layer does not implement: refused with their name, never ignored.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "trainable_token_indices": None,
    "target_parameters": None,
}


def adapter_config(
    spec: LoraSpec, base_model_name_or_path: str, *, fan_in_fan_out: bool = False
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT writes for a LoRA with these settings.

    ``fan_in_fan_out`` is true for an adapter on ``Conv1D`` layers (GPT-2), as PEFT sets it.
    """
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": spec.alpha,
        "lora_bias": False,
        "lora_dropout": spec.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def adapter_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s A and B under PEFT's key names (adapter name left out)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter in layer.specs:
            for part, weight in (("A", layer.weight_a(adapter)), ("B", layer.weight_b(adapter))):
                key = f"{KEY_PREFIX}{name}.lora_{part}.weight"
                tensors[key] = weight.detach().to("cpu").contiguous()
    if not tensors:
        raise InputError(f"no adapter named {adapter!r} on the model", field="adapter")
    return tensors


def save_adapter(
    model: nn.Module, folder: Path, adapter: str = "default", base_model_name_or_path: str = ""
) -> Path:
    """Write adapter ``adapter`` to ``folder`` in PEFT's format; returns the folder.

    Files are written beside their final names and renamed into place, so a crash never
    leaves a folder whose config and weights disagree.
    """
    layers = [layer for _, layer in lora_layers(model) if adapter in layer.specs]
    specs = {layer.specs[adapter] for layer in layers}
    if len(specs) != 1:
        raise InputError(f"adapter {adapter!r} is missing or has mixed settings", field="adapter")
    spec = specs.pop()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, adapter)
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers)
    config = adapter_config(spec, base_model_name_or_path, fan_in_fan_out=fan_in_fan_out)
    _write_atomically(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, {"format": "pt"}))
    _write_atomically(
        folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n")
    )
    return folder


def _write_atomically(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter_config(
    folder: Path, module_names: list[str] | None = None
) -> tuple[LoraSpec, dict[str, Any]]:
    """Read and check ``adapter_config.json``; returns the spec and the raw config.

    Args:
        folder: the adapter folder.
        module_names: the modules the weights file holds; needed only when
            ``target_modules`` is a regex (PEFT allows one string), to name the targets.
    """
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"no {CONFIG_NAME} in the adapter folder", file=folder)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}", file=path) from None
    if not isinstance(raw, dict):
        raise InputError("must hold a JSON object", file=path)
    if raw.get("peft_type") != "LORA":
        raise InputError(f"peft_type is {raw.get('peft_type')!r}, not 'LORA'", file=path)
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value not in (default, None, {}, [], False) or (key == "bias" and value != "none"):
            raise InputError(f"{value!r} is not supported (only {default!r})", file=path, field=key)
    if not isinstance(raw.get("fan_in_fan_out", False), bool):
        raise InputError("must be true or false", file=path, field="fan_in_fan_out")
    targets = _target_names(raw.get("target_modules"), module_names, path)
    try:
        spec = LoraSpec(
            r=raw.get("r"),  # type: ignore[arg-type]
            alpha=raw.get("lora_alpha"),  # type: ignore[arg-type]
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            target_modules=targets,
            use_rslora=raw.get("use_rslora", False) is True,
        )
    except InputError as exc:
        renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
        field = renamed.get(exc.field or "", exc.field)
        raise InputError(exc.reason, file=path, field=field) from None
    return spec, raw


def _target_names(targets: Any, module_names: list[str] | None, path: Path) -> tuple[str, ...]:
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    if isinstance(targets, str) and module_names is not None:
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise InputError(f"bad regex: {exc}", file=path, field="target_modules") from None
        strays = [m for m in module_names if not pattern.fullmatch(m)]
        if strays:
            raise InputError(
                f"regex {targets!r} does not match module {strays[0]!r} in the weights",
                file=path,
                field="target_modules",
            )
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in module_names}))
    raise InputError("must be a list of module names", file=path, field="target_modules")


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``; a folder with only a pickle file is refused."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        hint = f" ({pickles[0]} is a pickle file and is never loaded)" if pickles else ""
        raise InputError(f"no {WEIGHTS_NAME} in the adapter folder{hint}", file=folder)
    try:
        # From bytes, not load_file: safetensors 0.8's file loader keeps ~1 KB per call,
        # which a replica loading adapters back after evictions piles up for ever.
        return load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise InputError(f"not a readable safetensors file: {exc}", file=path) from None


def load_adapter(model: nn.Module, folder: Path, adapter: str = "default") -> LoraSpec:
    """Add the PEFT-format adapter in ``folder`` to ``model`` under the name ``adapter``.

    Everything is checked before the model is touched: a mismatch raises with every
    problem listed (module, expected and found shapes), and leaves the model as it was.

    Raises:
        AdapterMismatchError: the adapter does not fit this model.
    """
    folder = Path(folder)
    tensors = read_adapter_tensors(folder)
    pairs = _pair_tensors(tensors, folder)
    spec, raw = read_adapter_config(folder, list(pairs))
    if any(adapter in layer.specs for _, layer in lora_layers(model)):
        raise InputError(f"the model already has an adapter named {adapter!r}", field="adapter")
    _check_fits(model, spec, pairs, folder, fan_in_fan_out=raw.get("fan_in_fan_out") is True)
    add_adapter_to_modules(model, list(pairs), adapter, spec, initialise=False)
    _copy_pairs(model, adapter, pairs)
    return spec


def load_adapter_weights(model: nn.Module, folder: Path, adapter: str = "default") -> None:
    """Overwrite an existing adapter's A and B with the ones saved in ``folder``.

    Used to resume training: the adapter is already on the model, with the same modules.
    """
    pairs = _pair_tensors(read_adapter_tensors(Path(folder)), Path(folder))
    have = {name for name, layer in lora_layers(model) if adapter in layer.specs}
    if set(pairs) != have:
        raise AdapterMismatchError(
            f"saved modules differ from adapter {adapter!r}'s: {sorted(set(pairs) ^ have)[:5]}",
            file=folder,
        )
    for module_name, (a, b) in pairs.items():
        layer = model.get_submodule(module_name)
        assert isinstance(layer, LoRALinear)
        if a.shape != layer.weight_a(adapter).shape or b.shape != layer.weight_b(adapter).shape:
            raise AdapterMismatchError(f"{module_name}: saved shapes differ", file=folder)
    _copy_pairs(model, adapter, pairs)


def _copy_pairs(
    model: nn.Module, adapter: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    with torch.no_grad():
        for module_name, (a, b) in pairs.items():
            layer = model.get_submodule(module_name)
            assert isinstance(layer, LoRALinear)
            layer.weight_a(adapter).copy_(a)
            layer.weight_b(adapter).copy_(b)


def _pair_tensors(
    tensors: dict[str, torch.Tensor], folder: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(KEY_PREFIX))
        if not key.startswith(KEY_PREFIX) or match is None:
            expected = f"{KEY_PREFIX}<module>.lora_A.weight"
            problems.append(f"unexpected tensor {key!r} (expected {expected})")
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    for module, found in parts.items():
        missing = {"A", "B"} - set(found)
        if missing:
            problems.append(f"{module}: lora_{missing.pop()}.weight is missing")
    if not parts:
        problems.append("the file holds no LoRA tensors")
    if problems:
        raise AdapterMismatchError("; ".join(problems), file=folder / WEIGHTS_NAME)
    return {module: (found["A"], found["B"]) for module, found in parts.items()}


def _check_fits(
    model: nn.Module,
    spec: LoraSpec,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    folder: Path,
    *,
    fan_in_fan_out: bool,
) -> None:
    problems = []
    conv1d: list[str] = []
    for module_name, (a, b) in pairs.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{module_name}: no such module in the model")
            continue
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if not is_linear(base):
            problems.append(f"{module_name}: is {type(base).__name__}, not a linear layer")
            continue
        d_out, d_in = linear_shape(base)
        if is_conv1d(base):
            conv1d.append(module_name)
        want_a, want_b = (spec.r, d_in), (d_out, spec.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{module_name}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                f"the model and r={spec.r} need lora_A {want_a}, lora_B {want_b}"
            )
        if not any(matches_target(module_name, t) for t in spec.target_modules):
            problems.append(f"{module_name}: not among target_modules {list(spec.target_modules)}")
    # Written true when any target is a Conv1D, as PEFT does. PEFT flips a wrong flag with a
    # warning; one that disagrees with the layers says the file was made for another model.
    if fan_in_fan_out and not conv1d:
        problems.append("fan_in_fan_out is true, but no targeted layer is a Conv1D")
    elif conv1d and not fan_in_fan_out:
        problems.append(f"fan_in_fan_out is false, but {min(conv1d)} is a Conv1D (transposed)")
    if problems:
        raise AdapterMismatchError("; ".join(problems), file=folder)
