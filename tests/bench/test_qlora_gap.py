"""bench/qlora_gap.py runs: an NF4-trained adapter compared on the NF4 and fp32 bases."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tests.bench.test_benchmarks import run_bench

GAPS = ("adapter_fp32_vs_nf4", "base_fp32_vs_nf4", "adapter_effect_on_nf4")
GAP_FIGURES = {
    "positions",
    "max_abs_logit_diff",
    "mean_abs_logit_diff",
    "mean_kl",
    "top1_agreement",
}
LOSSES = {"adapter_on_nf4", "adapter_on_fp32", "base_nf4", "base_fp32"}


# As the NF4 training tests decide: bitsandbytes' CPU backend does NF4 whenever it is installed.
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="needs lora-ops[qlora] (bitsandbytes) for the NF4 base",
)
def test_qlora_gap_compares_the_adapter_on_both_bases(tiny_base: Path) -> None:
    figures = run_bench("qlora_gap.py", "--base", str(tiny_base), "--steps", "2", "--examples", "4")
    assert figures["train_steps"] == 2
    assert figures["examples"] == 4
    assert float(figures["train_seconds"]) > 0  # type: ignore[arg-type]
    for gap in GAPS:
        measured = figures[gap]
        assert isinstance(measured, dict)
        assert set(measured) == GAP_FIGURES
        assert measured["positions"] > 0
        assert all(math.isfinite(value) for value in measured.values())
        assert 0.0 <= measured["top1_agreement"] <= 1.0
        assert measured["mean_kl"] >= 0.0
    bases = figures["base_fp32_vs_nf4"]
    assert isinstance(bases, dict)
    assert bases["max_abs_logit_diff"] > 0  # 4-bit rounding moves the logits
    assert bases["mean_abs_logit_diff"] > 0
    losses = figures["eval_loss"]
    assert isinstance(losses, dict)
    assert set(losses) == LOSSES
    assert all(math.isfinite(value) and value > 0 for value in losses.values())
