"""The gateway's Prometheus metrics: answers by replica and outcome, retries, its own time.

A registry per app, as the replica keeps, so several gateways can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lora_ops.gateway.load import Load

# The gateway's own time is parsing, choosing and copying bytes: well under a millisecond
# when healthy, so the buckets start far below a replica's.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter  # by replica and outcome: ok, client_error, failed, broken, abandoned
    retries: Counter  # a second replica tried after the first failed
    failovers: Counter  # ... and the second one answered
    broken_streams: Counter  # a stream that failed after its first event was relayed
    unavailable: Counter  # no replica could answer: the caller got a 503
    overhead: Histogram  # seconds a request spent in the gateway, upstream time excluded


def gateway_metrics(load: Load) -> GatewayMetrics:
    registry = CollectorRegistry()
    registry.register(_InflightCollector(load))
    requests = Counter(
        "lora_ops_gateway_requests",
        "Attempts sent to replicas, by replica and outcome.",
        ["replica", "outcome"],
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
