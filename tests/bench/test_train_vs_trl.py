"""bench/train_vs_trl.py at a tiny size: every contender trains, one evaluator scores them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.test_benchmarks import run_bench


def test_train_vs_trl_trains_every_contender_the_same_steps(tiny_base: Path) -> None:
    figures = run_bench(
        "train_vs_trl.py",
        *("--base", str(tiny_base), "--steps", "2", "--batch", "2"),
        *("--rounds", "1", "--heldout", "20", "--rank", "4"),
    )
    for contender in ("lora-ops", "trl", "lora-ops-packed"):
        done = figures[contender]
        assert done["steps"] == 2
        assert done["tokens_per_second"] > 0
        assert done["peak_rss_mb"] > 100  # a whole process with torch loaded
        assert math.isfinite(done["heldout_loss"])
        assert done["heldout_loss"] > 0
    # Two steps of LoRA barely move a random model: both land near each other.
    assert figures["lora-ops"]["heldout_loss"] == pytest.approx(
        figures["trl"]["heldout_loss"], rel=0.05
    )
    assert set(figures["ratios"]) == {
        f"{kind} {pair}"
        for kind in ("process", "tokens/s", "heldout", "rss")
        for pair in ("lora-ops/trl", "packed/unpacked")
    }
