"""PEFT file format: our adapters load in real PEFT with the same logits, and PEFT's in ours."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from lora_ops import base_models
from lora_ops.errors import AdapterMismatchError, InputError
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora, load_adapter, save_adapter
from tests.helpers import randomize_adapter, sample_input_ids

PEFT_CONFIG_KEYS = {
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "task_type",
    "base_model_name_or_path",
    "modules_to_save",
    "init_lora_weights",
    "use_dora",
}


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def save_random_adapter(
    model: PreTrainedModel, folder: Path, spec: LoraSpec, seed: int = 0
) -> torch.Tensor:
    apply_lora(model, spec)
    randomize_adapter(model, "default", seed=seed)
    save_adapter(model, folder, base_model_name_or_path="tiny-llama")
    return logits(model, sample_input_ids(model.config.vocab_size))


@pytest.mark.parametrize(
    "spec",
    [
        LoraSpec(r=8, alpha=16),
        LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj", "down_proj")),
        LoraSpec(r=16, alpha=8, use_rslora=True),
    ],
    ids=["qkvo-r8", "mixed-targets-r4", "rslora-r16"],
)
def test_our_adapter_loads_in_peft_with_same_logits(
    tiny_model: PreTrainedModel, tiny_base: Path, tmp_path: Path, spec: LoraSpec
) -> None:
    ours = save_random_adapter(tiny_model, tmp_path, spec)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.keys() >= PEFT_CONFIG_KEYS
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    peft_model = PeftModel.from_pretrained(base_models.load_model(tiny_base, "cpu"), tmp_path)
    theirs = logits(peft_model, sample_input_ids(tiny_model.config.vocab_size))
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_peft_adapter_loads_in_ours_with_same_logits(
    tiny_model: PreTrainedModel, tiny_base: Path, tmp_path: Path
) -> None:
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["k_proj", "o_proj", "up_proj"],
        init_lora_weights=False,  # random B, so a broken loader cannot pass
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base_models.load_model(tiny_base, "cpu"), config)
    peft_model.save_pretrained(tmp_path)
    ids = sample_input_ids(tiny_model.config.vocab_size)
    theirs = logits(peft_model, ids)

    spec = load_adapter(tiny_model, tmp_path, adapter="acme")
    assert (spec.r, spec.alpha, set(spec.target_modules)) == (
        8,
        32,
        {"k_proj", "o_proj", "up_proj"},
    )
    with adapters_in_use(tiny_model, "acme"):
        ours = logits(tiny_model, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_save_load_round_trip(tiny_model: PreTrainedModel, tiny_base: Path, tmp_path: Path) -> None:
    expected = save_random_adapter(tiny_model, tmp_path, LoraSpec(r=4, alpha=4), seed=5)
    fresh = base_models.load_model(tiny_base, "cpu")
    load_adapter(fresh, tmp_path)
    with adapters_in_use(fresh, "default"):
        torch.testing.assert_close(
            logits(fresh, sample_input_ids(fresh.config.vocab_size)), expected
        )


def rewrite_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, "r: must be a whole number >= 1"),
        ({"r": -1}, "r: must be a whole number >= 1"),
        ({"r": "8"}, "r: must be a whole number >= 1"),
        ({"r": 16}, "the model and r=16 need lora_A (16, 64)"),
        ({"lora_alpha": "x"}, "lora_alpha: must be a number"),
        ({"peft_type": "IA3"}, "peft_type is 'IA3', not 'LORA'"),
        ({"use_dora": True}, "use_dora: True is not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out is true, but no targeted layer is a Conv1D"),
        ({"bias": "all"}, "bias: 'all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save: ['lm_head'] is not supported"),
        ({"target_modules": ["k_proj"]}, "not among target_modules ['k_proj']"),
        ({"target_modules": 5}, "target_modules: must be a list"),
    ],
    ids=[
        "r0",
        "r-negative",
        "r-string",
        "r-disagrees",
        "alpha-string",
        "not-lora",
        "dora",
        "fan-in-fan-out",
        "bias",
        "modules-to-save",
        "targets-disagree",
        "targets-number",
    ],
)
def test_hostile_config_is_refused_and_model_untouched(
    tiny_model: PreTrainedModel,
    tiny_base: Path,
    tmp_path: Path,
    changes: dict[str, object],
    message: str,
) -> None:
    save_random_adapter(tiny_model, tmp_path, LoraSpec(r=8, target_modules=("q_proj", "v_proj")))
    rewrite_config(tmp_path, **changes)
    fresh = base_models.load_model(tiny_base, "cpu")
    with pytest.raises(InputError, match=re.escape(message)):
        load_adapter(fresh, tmp_path)
    assert not any("lora_" in name for name, _ in fresh.named_parameters())


def test_adapter_for_another_model_names_every_mismatch(
    tiny_model: PreTrainedModel, tiny_base: Path, tmp_path: Path
) -> None:
    save_random_adapter(tiny_model, tmp_path, LoraSpec(r=4, target_modules=("q_proj",)))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(96, 4)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = base_models.load_model(tiny_base, "cpu")
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(fresh, tmp_path)
    text = str(info.value)
    assert "model.layers.1.self_attn.q_proj: lora_A (4, 64), lora_B (96, 4)" in text
    assert "model.layers.7.self_attn.q_proj: no such module" in text


def test_half_pair_is_refused(tiny_model: PreTrainedModel, tmp_path: Path) -> None:
    save_random_adapter(tiny_model, tmp_path, LoraSpec(r=2, target_modules=("q_proj",)))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="lora_B.weight is missing"):
        load_adapter(tiny_model, tmp_path, adapter="other")


class _Payload:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_only_folder_is_refused_and_never_unpickled(
    tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    folder = tmp_path / "adapter"
    save_random_adapter(tiny_model, folder, LoraSpec(r=2))
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "executed"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(InputError, match="adapter_model.bin is a pickle file and is never loaded"):
        load_adapter(tiny_model, folder, adapter="other")
    assert not marker.exists()


def test_corrupt_safetensors_is_refused(tiny_model: PreTrainedModel, tmp_path: Path) -> None:
    save_random_adapter(tiny_model, tmp_path, LoraSpec(r=2))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_adapter(tiny_model, tmp_path, adapter="other")
