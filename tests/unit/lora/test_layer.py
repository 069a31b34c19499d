"""LoRALinear on hand-sized modules: the identity at init, the update, merge and routing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_ops.errors import InputError
from lora_ops.lora import LoRALinear, LoraSpec


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 8)


def randomized(layer: LoRALinear, name: str, seed: int) -> LoRALinear:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight_a(name).copy_(
            torch.randn(layer.weight_a(name).shape, generator=generator) * 0.1
        )
        layer.weight_b(name).copy_(
            torch.randn(layer.weight_b(name).shape, generator=generator) * 0.1
        )
    return layer


def test_new_adapter_leaves_output_unchanged(base: nn.Linear) -> None:
    x = torch.randn(4, 16)
    expected = base(x)
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=4))
    layer.active = "acme"
    torch.testing.assert_close(layer(x), expected)
    assert torch.count_nonzero(layer.weight_a("acme")) > 0  # A is random, B is zero
    assert torch.count_nonzero(layer.weight_b("acme")) == 0


@pytest.mark.parametrize(
    ("r", "alpha", "use_rslora", "scaling"),
    [(4, 8.0, False, 2.0), (16, 16.0, False, 1.0), (16, 16.0, True, 4.0), (1, 3.0, True, 3.0)],
    ids=["r4-alpha8", "r16-alpha16", "rslora-r16", "rslora-r1"],
)
def test_forward_adds_scaled_low_rank_update(
    base: nn.Linear, r: int, alpha: float, use_rslora: bool, scaling: float
) -> None:
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=r, alpha=alpha, use_rslora=use_rslora))
    randomized(layer, "acme", seed=1)
    layer.active = "acme"
    x = torch.randn(2, 5, 16)
    a, b = layer.weight_a("acme"), layer.weight_b("acme")
    expected = base(x) + scaling * (x @ a.T @ b.T)
    assert layer.specs["acme"].scaling == pytest.approx(scaling)
    torch.testing.assert_close(layer(x), expected)


def test_base_weight_is_frozen_and_adapter_trains(base: nn.Linear) -> None:
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=2))
    layer.active = "acme"
    layer(torch.randn(3, 16)).sum().backward()
    assert base.weight.grad is None
    assert layer.weight_b("acme").grad is not None


@pytest.mark.parametrize(("r", "use_rslora"), [(1, False), (8, False), (8, True)])
def test_merge_then_unmerge_restores_weight(base: nn.Linear, r: int, use_rslora: bool) -> None:
    original = base.weight.detach().clone()
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=r, alpha=2.0 * r, use_rslora=use_rslora))
    randomized(layer, "acme", seed=2)
    layer.active = "acme"
    x = torch.randn(6, 16)
    unmerged = layer(x)
    layer.merge("acme")
    assert not torch.allclose(base.weight, original)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=0)
    layer.unmerge("acme")
    torch.testing.assert_close(base.weight, original, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_mixed_rows_equal_each_row_alone(base: nn.Linear) -> None:
    from lora_ops.lora.layer import RowGroup

    layer = LoRALinear(base)
    for seed, name in enumerate(["acme", "globex"]):
        layer.add_adapter(name, LoraSpec(r=2 + 2 * seed))
        randomized(layer, name, seed=seed)
    x = torch.randn(4, 3, 16)
    per_row = ["globex", None, "acme", "globex"]
    layer.row_groups = [
        RowGroup("acme", torch.tensor([2])),
        RowGroup("globex", torch.tensor([0, 3])),
    ]
    mixed = layer(x)
    layer.row_groups = None
    for row, name in enumerate(per_row):
        layer.active = name
        torch.testing.assert_close(mixed[row], layer(x[row : row + 1])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(5, 3, 16), (5, 16)])
def test_stacked_mixed_batch_equals_each_row_alone(base: nn.Linear, shape: tuple[int, ...]) -> None:
    from lora_ops.lora.layer import RowGroup

    layer = LoRALinear(base)
    for seed, (name, rank) in enumerate([("acme", 2), ("globex", 6), ("initech", 4)]):
        layer.add_adapter(name, LoraSpec(r=rank, alpha=2 * rank + seed))
        randomized(layer, name, seed=seed)
    layer.eval()
    x = torch.randn(*shape)
    per_row = ["globex", None, "acme", "globex", "initech"]
    layer.row_groups = [
        RowGroup(name, torch.tensor([i for i, a in enumerate(per_row) if a == name]))
        for name in ("acme", "globex", "initech")
    ]
    with torch.no_grad():
        mixed = layer(x)
        assert layer._row_stacks is not None  # the batched path ran, not the per-adapter loop
        again = layer(x)  # the cached stacks give the same answer
        layer.row_groups = None
        for row, name in enumerate(per_row):
            layer.active = name
            alone = layer(x[row : row + 1])[0]
            torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, mixed)


def test_stacks_follow_a_new_routing(base: nn.Linear) -> None:
    from lora_ops.lora.layer import RowGroup

    layer = LoRALinear(base)
    for seed, name in enumerate(["acme", "globex"]):
        layer.add_adapter(name, LoraSpec(r=4))
        randomized(layer, name, seed=seed)
    layer.eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer.row_groups = [
            RowGroup("acme", torch.tensor([0])),
            RowGroup("globex", torch.tensor([1])),
        ]
        first = layer(x)
        layer.row_groups = [
            RowGroup("globex", torch.tensor([0])),
            RowGroup("acme", torch.tensor([1])),
        ]
        swapped = layer(x)
        layer.row_groups = None
        layer.active = "globex"
        torch.testing.assert_close(swapped[0], layer(x[:1])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(first[0], swapped[0])


def test_fused_single_adapter_path_matches_the_formula(base: nn.Linear) -> None:
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=4, alpha=8))
    randomized(layer, "acme", seed=5)
    layer.active = "acme"
    x = torch.randn(2, 3, 16, requires_grad=True)
    expected = base(x) + 2.0 * (x @ layer.weight_a("acme").T) @ layer.weight_b("acme").T
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.weight_b("acme").grad is not None
    assert x.grad is not None
    assert base.weight.grad is None


def test_dropout_applies_to_lora_path_only_in_training(base: nn.Linear) -> None:
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=4, dropout=0.5))
    randomized(layer, "acme", seed=3)
    layer.active = "acme"
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_duplicate_and_unknown_adapters_are_refused(base: nn.Linear) -> None:
    layer = LoRALinear(base)
    layer.add_adapter("acme", LoraSpec(r=2))
    with pytest.raises(InputError, match="already"):
        layer.add_adapter("acme", LoraSpec(r=2))
    with pytest.raises(InputError, match="no adapter 'globex'"):
        layer.merge("globex")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -1}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": ("all-linear", "q_proj")}, "target_modules"),
        ({"target_modules": ("../q_proj",)}, "target_modules"),
    ],
    ids=["r0", "r-1", "r-float", "alpha0", "alpha-inf", "dropout1", "all-linear-and", "bad-name"],
)
def test_spec_refuses_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InputError) as info:
        LoraSpec(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
