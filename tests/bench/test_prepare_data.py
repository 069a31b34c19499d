"""bench/prepare_data.py still runs: tiny sizes on tiny-llama, its JSON line checked.

No figure is asserted beyond what the benchmark claims to show: each size prepared from
scratch, and the second prepare of the largest a cache hit that tokenized nothing.
"""

from __future__ import annotations

from pathlib import Path

from tests.bench.test_benchmarks import run_bench


def test_prepare_data_reports_memory_by_size_and_the_cache_hit(tiny_base: Path) -> None:
    figures = run_bench("prepare_data.py", "--base", str(tiny_base), "--sizes", "40,120")

    assert set(figures["sizes"]) == {"40", "120"}
    for size, measured in figures["sizes"].items():
        assert measured["train"] + measured["eval"] == int(size)
        assert not measured["cache_hit"]
        assert measured["tokenize_calls"] == 1
        assert measured["peak_rss_bytes"] > 0
        assert measured["peak_private_total_bytes"] > 0
    again = figures["second_prepare_of_largest"]
    assert again["cache_hit"]
    assert again["tokenize_calls"] == 0
    assert figures["second_prepare_is_cache_hit"] is True
    assert figures["peak_rss_largest_over_smallest"] > 0
    assert figures["peak_private_largest_over_smallest"] > 0
