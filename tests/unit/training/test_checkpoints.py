"""Resumable checkpoints on tiny-llama: what counts as one, how many stay, and the round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from lora_ops.errors import InputError
from lora_ops.lora import LoraSpec, apply_lora, lora_layers
from lora_ops.training import checkpoints
from tests.helpers import randomize_adapter


def adapted(model: PreTrainedModel) -> torch.optim.Optimizer:
    """Give ``model`` a random adapter and an optimizer with state (one step taken)."""
    apply_lora(model, LoraSpec(r=2))
    randomize_adapter(model, "default", seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=torch.arange(1, 9).reshape(1, 8)).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def adapter_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{part}": weight.detach().clone()
        for name, layer in lora_layers(model)
        for part, weight in (("A", layer.weight_a("default")), ("B", layer.weight_b("default")))
    }


def test_only_whole_checkpoints_count_and_the_newest_stay(
    tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    optimizer = adapted(tiny_model)
    for step in (2, 4, 10):  # 10 after 4: steps sort as numbers, not as names
        checkpoints.save(tmp_path, step, tiny_model, optimizer, "run")
    (tmp_path / ".step-12.partial").mkdir()  # a save cut off before its rename
    (tmp_path / "step-14").mkdir()  # renamed by hand, without its state
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-4", "step-10"]
    assert checkpoints.latest(tmp_path) == tmp_path / "step-10"
    assert checkpoints.latest(tmp_path / "none-yet") is None


def test_restore_brings_back_weights_optimizer_and_random_state(
    tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    optimizer = adapted(tiny_model)
    weights = adapter_weights(tiny_model)
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    saved = checkpoints.save(tmp_path, 3, tiny_model, optimizer, "run")
    next_draws = (torch.rand(3), random.random())

    randomize_adapter(tiny_model, "default", seed=2)
    for state in optimizer.state.values():
        state["exp_avg"].zero_()
    torch.rand(5)  # move both generators on
    random.random()
    assert checkpoints.restore(saved, tiny_model, optimizer, "run") == 3
    for key, tensor in adapter_weights(tiny_model).items():
        torch.testing.assert_close(tensor, weights[key])
    for state, expected in zip(optimizer.state.values(), moments, strict=True):
        torch.testing.assert_close(state["exp_avg"], expected)
    torch.testing.assert_close(torch.rand(3), next_draws[0])
    assert random.random() == next_draws[1]


def test_a_checkpoint_of_another_run_is_refused(
    tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    optimizer = adapted(tiny_model)
    saved = checkpoints.save(tmp_path, 2, tiny_model, optimizer, checkpoints.fingerprint("a"))
    with pytest.raises(InputError, match="another config, dataset or base model"):
        checkpoints.restore(saved, tiny_model, optimizer, checkpoints.fingerprint("b"))
