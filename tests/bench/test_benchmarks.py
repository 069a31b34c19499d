"""The benchmarks still run: each on tiny-llama at toy sizes, its JSON line checked.

No timing is asserted here (that is what the benchmarks are for); these catch a script
that no longer runs, or that reports a figure it did not measure.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from common import append_row, percentile  # noqa: E402


def run_bench(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--no-write", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures: dict[str, object] = json.loads(lines[-1])
    assert figures["benchmark"] == script.removesuffix(".py")
    assert figures["command"].startswith(f"python bench/{script}") or script in figures["command"]
    return figures


def test_train_step_compares_four_systems(tiny_base: Path) -> None:
    figures = run_bench(
        "train_step.py",
        "--base",
        str(tiny_base),
        "--rounds",
        "1",
        "--steps",
        "1",
        "--seq",
        "32",
        "--rank",
        "4",
    )
    for system in ("lora-ops", "lora-ops-ckpt", "peft", "full"):
        assert figures[system]["step_seconds"] > 0
    # The same adapter on the same model: both LoRA implementations train as many weights.
    for system in ("lora-ops", "lora-ops-ckpt"):
        assert figures[system]["trainable_parameters"] == figures["peft"]["trainable_parameters"]
    assert figures["full"]["trainable_parameters"] > 10 * figures["peft"]["trainable_parameters"]
    assert set(figures["ratios"]) >= {
        "step lora-ops/peft",
        "memory lora-ops/peft",
        "memory checkpointed/not",
    }


def test_serve_mixed_gives_every_contender_equal_work(tiny_base: Path) -> None:
    figures = run_bench(
        "serve_mixed.py",
        "--base",
        str(tiny_base),
        "--rounds",
        "1",
        "--requests",
        "4",
        "--new-tokens",
        "4",
        "--rank",
        "4",
        "--http-tokens",
        "4",
    )
    assert set(figures["tokens_per_second"]) == {
        "mixed", "base", "peft_mixed", "one_at_a_time", "http_mixed", "http_base",
    }  # fmt: skip
    assert all(v > 0 for v in figures["tokens_per_second"].values())
    assert set(figures["targets_met"]) == set(figures["targets"])


def test_merged_latency_times_base_merged_and_unmerged(tiny_base: Path) -> None:
    figures = run_bench(
        "merged_latency.py",
        "--base",
        str(tiny_base),
        "--rounds",
        "2",
        "--new-tokens",
        "4",
        "--rank",
        "4",
    )
    assert set(figures["median_ms"]) == {"base", "merged", "unmerged"}
    assert figures["ratios"]["merged/base"] > 0


def test_results_rows_land_in_their_own_table(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nprose that stays\n")
    append_row("train_step", "| a | 1 |", results)
    append_row("serve_mixed", "| b | 2 |", results)
    append_row("train_step", "| c | 3 |", results)
    text = results.read_text()
    assert "prose that stays" in text
    train = text.split("<!-- train_step -->")[1].split("<!-- /train_step -->")[0]
    assert train.index("| a | 1 |") < train.index("| c | 3 |")
    assert "| b | 2 |" not in train


@pytest.mark.parametrize(("q", "expected"), [(0, 1.0), (50, 2.5), (100, 4.0), (99, 3.97)])
def test_percentile_interpolates(q: float, expected: float) -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_adapter_load_measures_both_sources_and_memory(tiny_base: Path) -> None:
    figures = run_bench(
        "adapter_load.py",
        "--base",
        str(tiny_base),
        "--loads",
        "4",
        "--adapters",
        "16",
        "--cache",
        "4",
        "--requests",
        "8",
        "--concurrency",
        "2",
    )
    for source in ("local", "s3"):
        assert figures["empty_cache_ms"][source]["n"] == 4
        assert figures["empty_cache_ms"][source]["p50"] > 0
    assert figures["churn"]["errors"] == 0
    assert figures["memory"]["rss_max_mb"] >= figures["memory"]["rss_base_mb"] > 0


def test_pipeline_times_functions_that_exist() -> None:
    # The whole run is make test-slow; a function it wraps that was renamed or moved would
    # fail it only there.
    spec = importlib.util.spec_from_file_location("pipeline_bench", BENCH / "pipeline.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    missing = [
        f"{module}.{name}"
        for module, name, _ in bench.WRAPPED
        if not hasattr(importlib.import_module(module), name)
    ]
    assert missing == []


@pytest.mark.long  # make test-slow: a whole retrain run
def test_pipeline_splits_a_real_run_into_compute_and_the_rest(tiny_base: Path) -> None:
    figures = run_bench(
        "pipeline.py", "--base", str(tiny_base), "--max-steps", "2", "--checkpoint-every", "1"
    )
    (run,) = figures["runs"].values()
    assert run["inside_s"] > 0
    assert run["total_s"] == pytest.approx(run["inside_s"] + run["overhead_s"], abs=0.05)
    assert {"train", "evaluate", "register"} <= set(run["tasks_s"])


def test_head_of_line_times_the_short_request_on_both_engines(tiny_base: Path) -> None:
    figures = run_bench(
        "head_of_line.py", "--base", str(tiny_base), "--rounds", "1", "--long-tokens", "12"
    )
    assert set(figures["behind_long/alone"]) == {"continuous", "window"}
    assert all(v > 0 for v in figures["short_latency_median_s"].values())


def test_prefix_reuse_hits_only_for_the_same_adapter(tiny_base: Path) -> None:
    figures = run_bench(
        "prefix_reuse.py", "--base", str(tiny_base), "--requests", "2", "--system-tokens", "64"
    )
    assert figures["answers_equal"] is True
    assert figures["other_adapter_hit_tokens"] == 0
    assert 0 < figures["prefix_hit_rate"] < 1


def test_decode_floor_reports_the_engine_over_the_hardware(tiny_base: Path) -> None:
    figures = run_bench(
        "decode_floor.py", "--base", str(tiny_base), "--rounds", "1", "--new-tokens", "4",
        "--rows", "2",
    )  # fmt: skip
    assert figures["batch1_ms_per_token"]["engine"] > 0
    assert figures["batch1_ms_per_token"]["weight_read_floor"] > 0
    assert figures["batch1 engine/floor"] > 0


def test_serve_workload_runs_every_contender_and_phase(tiny_base: Path) -> None:
    figures = run_bench(
        "serve_workload.py", "--base", str(tiny_base), "--clients", "2", "--requests", "4",
        "--adapters", "7", "--rank", "2", "--open-requests", "2", "--load-fractions", "0.5",
        "--batch", "4",
    )  # fmt: skip
    assert set(figures["saturated"]) == {"continuous", "window", "peft_static"}
    for run in figures["saturated"].values():
        assert 0 < run["saturated_seconds"] <= run["seconds"]
        assert run["steady_tokens_per_second"] > 0
    (below,) = figures["below_saturation"].values()
    assert {name: run["requests"] for name, run in below.items()} == {
        "continuous": 2, "window": 2, "peft_static": 2,
    }  # fmt: skip
    assert figures["http"]["saturated"]["requests"] == 4
    assert figures["http"]["saturated"]["failed"] == 0
    many = figures["many_adapters"]
    assert many["resident_adapters"] == 7
    assert [run["adapters"] for run in many["runs"]] == [5, 7, 5]
    assert figures["ratios"]["7 adapters/5"] > 0
    assert set(figures["targets_met"]) == set(figures["targets"])


def test_steady_throughput_counts_tokens_only_until_the_last_request_was_sent() -> None:
    from workload import Run, Timing

    # Sent at 0; the run saturated until 10. One request done at 8 (40 tokens), one
    # decoding from 6 to 16 (100 tokens: 40 of them by 10), one starting after 10.
    run = Run(
        timings=[
            Timing(0.0, first=1.0, done=8.0, tokens=40),
            Timing(5.0, first=6.0, done=16.0, tokens=100),
            Timing(9.0, first=12.0, done=20.0, tokens=50),
        ],
        seconds=20.0,
        started=0.0,
        saturated_until=10.0,
    )
    assert run.steady_tokens_per_second() == pytest.approx((40 + 40) / 10)
    figures = run.figures()
    assert figures["saturated_seconds"] == 10.0
    assert figures["tokens_per_second"] == pytest.approx(190 / 20)


def test_structured_decoding_compares_equal_work(tiny_base: Path) -> None:
    figures = run_bench(
        "structured_decoding.py",
        "--base",
        str(tiny_base),
        "--rows",
        "2",
        "--new-tokens",
        "6",
        "--rounds",
        "1",
    )
    assert set(figures["ms_per_token"]) == {"free", "constrained", "mixed"}
    assert figures["constrained/free"] > 0
    # rounds x (2 constrained rows + 1 in the mixed batch), each checked against the schema
    assert figures["constrained_outputs_checked"] == 3
    assert figures["grammar_ms_per_constrained_token"] > 0
