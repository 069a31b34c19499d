"""bench/fleet_gateway.py still runs: three tiny-llama replicas, a handful of customers.

No timing or reduction is asserted (that is what the benchmark is for); this catches a
script that no longer runs, or that reports a figure it did not measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_fleet_gateway_measures_latency_and_cold_loads_per_routing(tiny_base: Path) -> None:
    # One fleet, its cache just large enough (fit): the default runs a smaller one too.
    options = "--latency-requests 4 --customers 6 --cache fit --warm-up 4 --requests 12"
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleet_gateway.py"), "--no-write", "--base", str(tiny_base)]
        + options.split(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "fleet_gateway"
    latency = figures["latency_ms"]
    assert latency["direct"]["n"] == latency["gateway"]["n"] == 4
    assert latency["direct"]["p50"] > 0
    # Every timed request through the gateway was observed by its own-time histogram.
    assert figures["gateway_overhead_ms"]["n"] == 4
    (fit,) = figures["cold_loads"]
    assert fit["cache_rule"] == "fit"
    assert fit["cache"] == max(fit["customers_placed_per_replica"])
    assert sum(fit["customers_placed_per_replica"]) == 6 * 2  # k=2 copies each
    # Every placed adapter stays resident: routing by placement never reloads one.
    assert fit["per_1000"]["placement"] == fit["per_1000"]["preferred"] == 0
    assert set(fit["per_1000"]) == {"placement", "preferred", "random"}
    assert sum(fit["placement"]["requests_by_replica"]) == 4 + 12  # warm-up included
    assert figures["targets_met"]["reduction"] == {"fit": fit["reduction"] >= 0.90}
