"""The gateway's Prometheus metrics: answers by replica, customer bucket and outcome,
retries, routing that made a replica load an adapter, its own time.

A registry per app, as the replica keeps, so several gateways can live in one process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lora_ops.gateway.load import Load

# The gateway's own time is parsing, choosing and copying bytes: well under a millisecond
# when healthy, so the buckets start far below a replica's.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# Customers share a label value by hash: thousands of them must not mean thousands of
# series per replica and outcome. A bucket shows whether trouble is one customer's or all's.
CUSTOMER_BUCKETS = 16
BASE_BUCKET = "base"
BASE_MODEL_NAME = "base"
# The header a lora-ops replica answers with: whether the adapter was resident on arrival.
ADAPTER_HEADER = "x-lora-ops-adapter"


def customer_bucket(model: str) -> str:
    """``base`` for the base model, else ``c00``..``c15``: the same for a customer in every
    process and release (blake2b, where ``hash()`` of a str changes with each process)."""
    if model == BASE_MODEL_NAME:
        return BASE_BUCKET
    digest = hashlib.blake2b(model.encode(), digest_size=8).digest()
    return f"c{int.from_bytes(digest, 'big') % CUSTOMER_BUCKETS:02d}"


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    # by replica, customer bucket and outcome: ok, client_error, failed, broken, abandoned,
    # misplaced (it did not hold the model: placement had moved)
    requests: Counter
    retries: Counter  # a second replica tried after the first failed
    failovers: Counter  # ... and the second one answered
    broken_streams: Counter  # a stream that failed after its first event was relayed
    unavailable: Counter  # no replica could answer: the caller got a 503
    overhead: Histogram  # seconds a request spent in the gateway, upstream time excluded
    cold_routes: Counter  # by replica: answers whose adapter the replica had to load first


def gateway_metrics(load: Load) -> GatewayMetrics:
    registry = CollectorRegistry()
    registry.register(_InflightCollector(load))
    requests = Counter(
        "lora_ops_gateway_requests",
        "Attempts sent to replicas, by replica, customer bucket (base, c00..c15) and outcome.",
        ["replica", "bucket", "outcome"],
        registry=registry,
    )
    return GatewayMetrics(
        registry,
        requests,
        Counter(
            "lora_ops_gateway_retries", "Requests tried on a second replica.", [], registry=registry
        ),
        Counter(
            "lora_ops_gateway_failovers",
            "Retries a second replica answered.",
            [],
            registry=registry,
        ),
        Counter(
            "lora_ops_gateway_broken_streams", "Streams broken mid-way.", [], registry=registry
        ),
        Counter(
            "lora_ops_gateway_unavailable",
            "Requests no replica could answer.",
            [],
            registry=registry,
        ),
        Histogram(
            "lora_ops_gateway_overhead_seconds",
            "Time a forwarded request spent in the gateway: total minus time awaiting replicas.",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        ),
        Counter(
            "lora_ops_gateway_cold_routes",
            f"Answers whose {ADAPTER_HEADER} header said cold: the replica had to load the "
            "adapter first. Replicas that send no such header (vLLM) are not counted.",
            ["replica"],
            registry=registry,
        ),
    )


class _InflightCollector(Collector):
    """Requests in flight per replica, read at scrape time."""

    def __init__(self, load: Load) -> None:
        self.load = load

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "lora_ops_gateway_inflight", "Requests in flight, by replica.", labels=["replica"]
        )
        for url, count in sorted(self.load.snapshot().items()):
            gauge.add_metric([url], count)
        yield gauge
