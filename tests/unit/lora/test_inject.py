"""LoRA on a whole model (tiny-llama): injection, freezing, merging and mixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lora_ops.errors import InputError
from lora_ops.lora import (
    LoRALinear,
    LoraSpec,
    adapters_in_use,
    apply_lora,
    delete_adapter,
    lora_layers,
    merge_adapter,
    remove_lora,
    set_adapter,
    unmerge_adapter,
)
from tests.helpers import randomize_adapter, sample_input_ids


def logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_apply_lora_wraps_targets_and_freezes_the_rest(tiny_model: PreTrainedModel) -> None:
    report = apply_lora(tiny_model, LoraSpec(r=4, target_modules=("q_proj", "v_proj")))
    wrapped = [n for n, m in tiny_model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * tiny_model.config.num_hidden_layers
    assert all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 kv heads of 16); r=4 on each of 2 layers
    expected = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert report.trainable == expected
    assert report.percent == pytest.approx(100 * expected / report.total)
    assert "trainable params" in str(report)


def test_target_matching_is_by_suffix(tiny_model: PreTrainedModel) -> None:
    report = apply_lora(tiny_model, LoraSpec(r=2, target_modules=("self_attn.o_proj",)))
    assert report.modules == tuple(
        f"model.layers.{i}.self_attn.o_proj" for i in range(tiny_model.config.num_hidden_layers)
    )


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (("q_proj", "qkv_proj"), "'qkv_proj' matches no module"),
        (("mlp",), "'mlp' matches LlamaMLP modules, not linear layers"),
        (("proj",), "'proj' matches no module"),
    ],
    ids=["unknown-name", "not-linear", "partial-name"],
)
def test_unmatched_target_is_refused_before_any_change(
    tiny_model: PreTrainedModel, targets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InputError, match=message) as info:
        apply_lora(tiny_model, LoraSpec(r=2, target_modules=targets))
    assert "q_proj" in str(info.value) or "LlamaMLP" in str(info.value)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())


def test_merge_equals_unmerged_and_unmerge_restores(tiny_model: PreTrainedModel) -> None:
    ids = sample_input_ids(tiny_model.config.vocab_size)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    apply_lora(tiny_model, LoraSpec(r=8, alpha=16))
    randomize_adapter(tiny_model, "default", seed=1)
    unmerged = logits(tiny_model, ids)
    merge_adapter(tiny_model, "default")
    torch.testing.assert_close(logits(tiny_model, ids), unmerged, atol=1e-4, rtol=0)
    unmerge_adapter(tiny_model, "default")
    for name, param in tiny_model.named_parameters():
        if "lora_" not in name:
            original = before[name.replace(".base_layer", "")]
            torch.testing.assert_close(param, original, atol=1e-5, rtol=0)


def test_merged_model_saves_as_plain_transformers(
    tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    ids = sample_input_ids(tiny_model.config.vocab_size)
    apply_lora(tiny_model, LoraSpec(r=4))
    randomize_adapter(tiny_model, "default", seed=2)
    adapted = logits(tiny_model, ids)
    merge_adapter(tiny_model, "default")
    remove_lora(tiny_model)
    tiny_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, ids), adapted, atol=1e-4, rtol=0)


def test_mixed_batch_equals_each_row_alone(tiny_model: PreTrainedModel) -> None:
    apply_lora(tiny_model, LoraSpec(r=4), adapter="acme")
    apply_lora(tiny_model, LoraSpec(r=8, target_modules=("q_proj", "down_proj")), adapter="globex")
    randomize_adapter(tiny_model, "acme", seed=3)
    randomize_adapter(tiny_model, "globex", seed=4)
    per_row = ["acme", None, "globex", "acme", "globex"]
    ids = sample_input_ids(tiny_model.config.vocab_size, batch=len(per_row))
    with adapters_in_use(tiny_model, per_row):
        mixed = logits(tiny_model, ids)
    for row, adapter in enumerate(per_row):
        with adapters_in_use(tiny_model, adapter):
            alone = logits(tiny_model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
    set_adapter(tiny_model, None)
    base_logits = logits(tiny_model, ids[1:2])
    torch.testing.assert_close(mixed[1:2], base_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0:1], base_logits, atol=1e-3)


def test_unknown_adapter_in_a_batch_is_refused(tiny_model: PreTrainedModel) -> None:
    apply_lora(tiny_model, LoraSpec(r=2), adapter="acme")
    with (
        pytest.raises(InputError, match="'initech'"),
        adapters_in_use(tiny_model, ["acme", "initech"]),
    ):
        pass


def test_delete_adapter_restores_plain_layers(tiny_model: PreTrainedModel) -> None:
    ids = sample_input_ids(tiny_model.config.vocab_size)
    expected = logits(tiny_model, ids)
    apply_lora(tiny_model, LoraSpec(r=2), adapter="acme")
    randomize_adapter(tiny_model, "acme")
    delete_adapter(tiny_model, "acme")
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    torch.testing.assert_close(logits(tiny_model, ids), expected)


def test_a_rank_above_a_targets_width_is_refused_before_anything_changes(
    tiny_model: PreTrainedModel,
) -> None:
    width = tiny_model.config.hidden_size
    with pytest.raises(InputError, match=f"r <= {width}") as refused:
        apply_lora(tiny_model, LoraSpec(r=width + 1))
    assert refused.value.field == "r"
    assert list(lora_layers(tiny_model)) == []  # no layer was wrapped
