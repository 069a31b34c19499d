"""What an engine counts: requests, tokens, preemptions, and latency histograms.

Kept as plain numbers the engine thread updates; :mod:`lora_ops.serving.metrics` turns
them into Prometheus metrics at scrape time, so the engine needs no metrics library.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from lora_ops.serving.cache import CacheStats
from lora_ops.serving.kv_cache import KVCacheStats

# vLLM's buckets for time to first token and end-to-end latency, and for inter-token
# latency, so dashboards made for vLLM read these as they read vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# Per-model labels for the first this many models seen; the rest share OTHER, so a replica
# serving thousands of customers does not export thousands of series per histogram.
MAX_MODEL_LABELS = 100
OTHER = "other"


@dataclass
class Histogram:
    """Counts per bucket (upper bounds; a last, infinite one is implied), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class ModelHistograms:
    """One histogram per model, for at most :data:`MAX_MODEL_LABELS` of them."""

    bounds: tuple[float, ...]
    by_model: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, model: str, value: float) -> None:
        if model not in self.by_model and len(self.by_model) >= MAX_MODEL_LABELS:
            model = OTHER
        histogram = self.by_model.get(model)
        if histogram is None:
            histogram = self.by_model[model] = Histogram(self.bounds)
        histogram.observe(value)


@dataclass
class EngineStats(CacheStats, KVCacheStats):
    """Counters the HTTP layer exports as Prometheus metrics."""

    requests: int = 0
    batches: int = 0  # decoding steps
    batch_sizes: Counter[int] = field(default_factory=Counter)  # rows -> decoding steps
    generated_tokens: int = 0
    prompt_tokens: int = 0
    rejected: int = 0  # refused: the queue, or the customer's share of it, was full
    preemptions: int = 0
    abandoned: int = 0  # the caller went away before the answer
    ttft: ModelHistograms = field(default_factory=lambda: ModelHistograms(TTFT_BUCKETS))
    itl: ModelHistograms = field(default_factory=lambda: ModelHistograms(ITL_BUCKETS))
    e2e: ModelHistograms = field(default_factory=lambda: ModelHistograms(E2E_BUCKETS))
