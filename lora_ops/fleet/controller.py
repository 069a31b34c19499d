"""The fleet kept true while it changes: replicas drained and brought back, customers
re-placed, hot customers given more copies.

Each tick the controller asks every registered replica's ``/health``. A replica that fails
``failures_to_drain`` checks in a row is drained (``down`` in the service database): the
gateways stop routing to it at their next refresh, and its customers are placed on the
others, each copy loaded and smoke-tested before the placement records it. A drained
replica that answers again is put back in rotation and takes its share back the same way.
A customer whose traffic stays above ``hot_requests_per_s`` gets a copy more per multiple
of it, up to every replica of its base; when it cools it falls back to ``copies``.

Every gateway runs a controller; a lease in the database lets one act at a time, so two
never move the same customer. Traffic is what the acting gateway saw: behind a load
balancer that spreads evenly, its share stands for the whole.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lora_ops.db import ACTIVE, DOWN, DeployInProgress, Replica
from lora_ops.fleet.client import Fleet
from lora_ops.fleet.placement import DEFAULT_COPIES, DEFAULT_LOAD_FACTOR
from lora_ops.fleet.placer import LEASE, LEASE_EXPIRY, plan, rebalance
from lora_ops.registry import Registry

log = logging.getLogger(__name__)
RATE_SMOOTHING = 0.5  # weight of the newest interval in a customer's request rate


@dataclass(frozen=True)
class ControllerConfig:
    """How the controller keeps the fleet.

    Attributes:
        copies: replicas per customer (k).
        load_factor: bounded-load cap factor of the placement.
        interval_s: seconds between ticks.
        health_timeout_s: the longest a health check waits.
        failures_to_drain: failed health checks in a row that drain a replica.
        replan_s: seconds between full re-plans when nothing changed (new customers,
            changes a busy tick left for later).
        hot_requests_per_s: a customer above this rate gets a copy more per multiple of
            it; None: every customer has ``copies``.
        max_moves: customers moved per tick, so the lease is held briefly.
    """

    copies: int = DEFAULT_COPIES
    load_factor: float = DEFAULT_LOAD_FACTOR
    interval_s: float = 2.0
    health_timeout_s: float = 2.0
    failures_to_drain: int = 2
    replan_s: float = 30.0
    hot_requests_per_s: float | None = None
    max_moves: int = 32


@dataclass
class Tick:
    """What one tick did."""

    acted: bool = False  # False: another gateway holds the lease
    drained: list[str] = field(default_factory=list)
    rejoined: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # customers placed anew
    failed: dict[str, str] = field(default_factory=dict)  # customer -> why it did not move


class FleetController:
    """Health checks, draining, rejoining and re-placement for one fleet.

    Args:
        fleet: the fleet client (its database holds replicas and placement).
        registry: where production versions are read.
        config: see :class:`ControllerConfig`.
        traffic: requests per model since the last call (the gateway's counts); None: no
            hot customers.
        clock: seconds, monotonic; tests pass their own.
    """

    def __init__(
        self,
        fleet: Fleet,
        registry: Registry,
        config: ControllerConfig | None = None,
        traffic: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = fleet
        self.registry = registry
        self.config = config or ControllerConfig()
        self.traffic = traffic
        self.clock = clock
        self.holder = f"{socket.gethostname()}:{os.getpid()}:controller"
        self.rates: dict[str, float] = {}  # customer -> smoothed requests per second
        self._failures: dict[str, int] = {}
        self._copies: dict[str, int] = {}
        self._members: list[tuple[str, str, str]] = []
        self._last_rates = clock()
        self._next_plan = float("-inf")

    def tick(self) -> Tick:
        """Check the replicas and move what must move, if this gateway holds the lease."""
        copies = self.hot_copies()  # counted every tick, so a rate spans one interval
        try:
            with self.fleet.db.deploy_lock(LEASE, self.holder, LEASE_EXPIRY):
                return self._act(copies)
        except DeployInProgress:
            return Tick()

    def run(self, stop: threading.Event) -> None:
        """Tick now and every ``interval_s`` until ``stop`` is set; a failed tick is logged."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("the fleet controller's tick failed; trying again next tick")
            stop.wait(self.config.interval_s)

    def _act(self, copies: dict[str, int]) -> Tick:
        done = Tick(acted=True)
        self.check_replicas(done)
        now = self.clock()
        # Replicas joining (`serve --fleet-url`), leaving (`fleet remove`) or draining.
        members = sorted((r.url, r.state, r.base_sha256 or "") for r in self.fleet.db.replicas())
        if members != self._members or copies != self._copies or now >= self._next_plan:
            self._members = members
            self._copies = copies
            self._next_plan = now + self.config.replan_s
            placement_plan = plan(
                self.fleet.db, self.registry, self.config.copies, self.config.load_factor, copies
            )
            moves = rebalance(self.fleet, placement_plan, self.config.max_moves)
            done.moved = [change.customer for change in moves.applied]
            done.failed = moves.failed
            if moves.failed or len(placement_plan.changes()) > len(moves.applied):
                self._next_plan = now  # what is left waits one tick, not a whole replan_s
        return done

    def check_replicas(self, done: Tick) -> None:
        """Ask every replica's /health at once; drain the failing, bring back the answering."""
        replicas = self.fleet.db.replicas()
        if not replicas:
            return
        timeout = self.config.health_timeout_s
        with ThreadPoolExecutor(max_workers=min(16, len(replicas))) as pool:
            answers = list(pool.map(lambda r: self.fleet.answers(r.url, timeout), replicas))
        for replica, why in zip(replicas, answers, strict=True):
            if why is None:
                self._answered(replica, done)
            else:
                self._failed(replica, why, done)

    def _answered(self, replica: Replica, done: Tick) -> None:
        self._failures[replica.url] = 0
        if replica.base_sha256 is None and (base := self.fleet.declared_base(replica.url)):
            self.fleet.db.add_replica(replica.url, *base)
        if replica.state == DOWN and self.fleet.db.set_replica_state(replica.url, ACTIVE):
            log.warning("replica %s answers again: back in rotation", replica.url)
            done.rejoined.append(replica.url)

    def _failed(self, replica: Replica, why: str, done: Tick) -> None:
        count = self._failures[replica.url] = self._failures.get(replica.url, 0) + 1
        if replica.state != ACTIVE or count < self.config.failures_to_drain:
            return
        if self.fleet.db.set_replica_state(replica.url, DOWN, why):
            log.warning(
                "replica %s drained after %d failed health checks: %s", replica.url, count, why
            )
            done.drained.append(replica.url)

    def hot_copies(self) -> dict[str, int]:
        """Customer -> copies, for customers whose smoothed rate is above the threshold."""
        threshold = self.config.hot_requests_per_s
        if self.traffic is None or threshold is None:
            return {}
        now = self.clock()
        elapsed = max(now - self._last_rates, 1e-3)
        self._last_rates = now
        counts = self.traffic()
        for model in self.rates.keys() | counts.keys():
            latest = counts.get(model, 0) / elapsed
            rate = RATE_SMOOTHING * latest + (1 - RATE_SMOOTHING) * self.rates.get(model, 0.0)
            if rate < threshold / 100:  # long cold: forget it, so the table stays small
                self.rates.pop(model, None)
            else:
                self.rates[model] = rate
        return {
            model: self.config.copies + math.floor(rate / threshold)
            for model, rate in sorted(self.rates.items())
            if rate >= threshold
        }
