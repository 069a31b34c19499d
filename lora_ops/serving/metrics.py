"""A replica's Prometheus metrics: engine counters read at scrape time, request counters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lora_ops.serving.engine import Engine
from lora_ops.serving.stats import ModelHistograms


@dataclass(frozen=True)
class ReplicaMetrics:
    registry: CollectorRegistry
    requests: Counter  # by route and status
    latency: Histogram  # by route


def replica_metrics(engine: Engine) -> ReplicaMetrics:
    """A fresh registry (one per app, so several apps can live in one process)."""
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    requests = Counter(
        "lora_ops_requests", "Requests by route and status.", ["route", "status"], registry=registry
    )
    latency = Histogram(
        "lora_ops_request_seconds", "Request latency.", ["route"], registry=registry
    )
    return ReplicaMetrics(registry, requests, latency)


class _EngineCollector(Collector):
    """Engine counters, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        for name, value, doc in (
            ("lora_ops_cache_hits", stats.cache_hits, "Adapter cache hits."),
            ("lora_ops_cache_misses", stats.cache_misses, "Adapter cache misses (loads)."),
            ("lora_ops_cache_evictions", stats.evictions, "Adapters evicted from the cache."),
            ("lora_ops_generated_tokens", stats.generated_tokens, "Tokens generated."),
            ("lora_ops_prompt_tokens", stats.prompt_tokens, "Prompt tokens processed."),
            ("lora_ops_batches", stats.batches, "Decoding batches run."),
            ("lora_ops_rejected_requests", stats.rejected, "Requests refused: queue full."),
            ("lora_ops_num_preemptions", stats.preemptions, "Rows preempted for KV room."),
            ("lora_ops_abandoned_requests", stats.abandoned, "Requests their callers left."),
            ("lora_ops_prefix_cache_queries", stats.prefix_queries, "Prompt tokens looked up."),
            ("lora_ops_prefix_cache_hits", stats.prefix_hits, "Prompt tokens found cached."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        sizes = GaugeMetricFamily(
            "lora_ops_batch_size_batches", "Batches run, by size.", labels=["size"]
        )
        for size, count in sorted(stats.batch_sizes.items()):
            sizes.add_metric([str(size)], count)
        yield sizes
        gauges: tuple[tuple[str, float, str], ...] = (
            ("lora_ops_max_batch_size", max(stats.batch_sizes, default=0), "Largest batch."),
            ("lora_ops_queue_depth", self.engine.queue_depth(), "Requests waiting for a batch."),
            ("lora_ops_queue_limit", self.engine.max_queue, "Most requests allowed to wait."),
            ("lora_ops_loaded_adapters", len(self.engine.models()) - 1, "Adapters registered."),
            ("lora_ops_resident_adapters", len(self.engine.resident_adapters()), "In memory."),
            ("lora_ops_num_requests_running", self.engine.running_count(), "Rows running."),
            ("lora_ops_num_requests_waiting", self.engine.queue_depth(), "Requests waiting."),
            ("lora_ops_kv_cache_usage_perc", self.engine.kv_cache_usage(), "KV blocks used, 0-1."),
        )
        for name, level, doc in gauges:
            yield GaugeMetricFamily(name, doc, value=level)
        for name, histograms, doc in (
            ("lora_ops_time_to_first_token_seconds", stats.ttft, "Time to first token."),
            ("lora_ops_inter_token_latency_seconds", stats.itl, "Time between tokens."),
            ("lora_ops_e2e_request_latency_seconds", stats.e2e, "Submission to answer."),
        ):
            yield _histogram(name, doc, histograms)


def _histogram(name: str, doc: str, histograms: ModelHistograms) -> HistogramMetricFamily:
    """Per-model histograms, in vLLM's shape (label ``model_name``), cumulative buckets."""
    family = HistogramMetricFamily(name, doc, labels=["model_name"])
    bounds = [str(b) for b in histograms.bounds] + ["+Inf"]
    for model, histogram in list(histograms.by_model.items()):
        counts = list(histogram.counts)
        cumulative, total = [], 0
        for bound, count in zip(bounds, counts, strict=True):
            total += count
            cumulative.append((bound, total))
        family.add_metric([model], cumulative, sum_value=histogram.total)
    return family
