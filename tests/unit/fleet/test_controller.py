"""The fleet controller: drains a replica that stops answering, re-places its customers
(loaded and smoke-tested first), brings it back when it answers, gives hot customers more
copies, and acts only while it holds the lease.

Replicas here are in memory (the HTTP calls are the fleet client's, tested against real
replicas in tests/integration/test_gateway.py); the database is a real SQLite file.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lora_ops.db import ACTIVE, DOWN, Database, DeployInProgress
from lora_ops.fleet.client import BaseIdentity, Fleet, ReplicaError
from lora_ops.fleet.controller import ControllerConfig, FleetController
from lora_ops.fleet.placer import LEASE, drain
from lora_ops.registry import AdapterVersion
from lora_ops.registry.tags import BASE_MODEL_SHA256_TAG, SMOKE_OUTPUT_TAG

LLAMA = "a" * 64
URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 4)]
CUSTOMERS = [f"c{i:02d}" for i in range(12)]


class MemoryFleet(Fleet):
    """Replicas as dicts: which answer /health, what each holds, which fail to load."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, admin_token="t")
        self.up = set(URLS)
        self.held: dict[str, set[str]] = {url: set() for url in URLS}
        self.broken_loads: set[tuple[str, str]] = set()  # (url, customer)
        self.calls: list[tuple[str, str, str]] = []  # (verb, url, name), in order

    def answers(self, url: str, timeout_s: float = 5.0) -> str | None:
        return None if url in self.up else "unreachable (ConnectError)"

    def declared_base(self, url: str) -> BaseIdentity | None:
        return BaseIdentity("tiny-llama", LLAMA) if url in self.up else None

    def load(self, url: str, name: str, lora_path: str, sha256: str | None = None) -> None:
        self.calls.append(("load", url, name))
        if url not in self.up or (url, name) in self.broken_loads:
            raise ReplicaError(url, "unreachable")
        self.held[url].add(name)

    def unload(self, url: str, name: str) -> None:
        self.calls.append(("unload", url, name))
        if url not in self.up:
            raise ReplicaError(url, "unreachable")
        self.held[url].discard(name)

    def smoke(self, url: str, name: str) -> str:
        self.calls.append(("smoke", url, name))
        assert name in self.held[url], "smoke-tested before it was loaded"
        return f"hello from {name}"


class Versions:
    """The registry's production versions, one per customer."""

    def __init__(self, customers: list[str]) -> None:
        self.customers = customers

    def production_versions(self, base_model: str | None = None) -> list[tuple[str, Any]]:
        return [(c, version(c)) for c in self.customers]


def version(customer: str) -> AdapterVersion:
    tags = {BASE_MODEL_SHA256_TAG: LLAMA, SMOKE_OUTPUT_TAG: f"hello from {customer}"}
    return AdapterVersion(customer, "1", tags, ("production",), None, "", "READY", "")


@pytest.fixture
def fleet(tmp_path: Path) -> MemoryFleet:
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    for url in URLS:
        db.add_replica(url, "tiny-llama", LLAMA)
    return MemoryFleet(db)


def controller(
    fleet: MemoryFleet, traffic: Any = None, clock: Any = None, **config: Any
) -> FleetController:
    return FleetController(
        fleet,
        Versions(CUSTOMERS),  # type: ignore[arg-type]
        ControllerConfig(**config),
        traffic=traffic,
        clock=clock or itertools.count().__next__,
    )


def holders(fleet: MemoryFleet) -> dict[str, set[str]]:
    """Customer -> replicas holding it, from the replicas themselves."""
    found: dict[str, set[str]] = {c: set() for c in CUSTOMERS}
    for url, names in fleet.held.items():
        for name in names:
            found[name].add(url)
    return found


def test_first_tick_places_every_customer_on_two_replicas(fleet: MemoryFleet) -> None:
    tick = controller(fleet).tick()
    assert tick.acted
    assert sorted(tick.moved) == CUSTOMERS
    placed = fleet.db.placements()
    assert {c: set(urls) for c, urls in placed.items()} == holders(fleet)
    assert all(len(urls) == 2 for urls in placed.values())
    for customer in CUSTOMERS:  # each copy was smoke-tested after its load
        for url in placed[customer]:
            calls = [c for c in fleet.calls if c[1:] == (url, customer)]
            assert calls[:2] == [("load", url, customer), ("smoke", url, customer)]


def test_a_replica_that_stops_answering_is_drained_and_its_customers_move(
    fleet: MemoryFleet,
) -> None:
    keeper = controller(fleet)
    keeper.tick()
    dead = URLS[0]
    orphans = [c for c, urls in fleet.db.placements().items() if dead in urls]
    fleet.up.discard(dead)

    first = keeper.tick()  # one failed check is not yet a verdict (a dropped packet)
    assert first.drained == []
    assert fleet.db.replicas()[0].state == ACTIVE
    second = keeper.tick()
    assert second.drained == [dead]
    row = fleet.db.replicas()[0]
    assert (row.state, row.state_detail) == (DOWN, "unreachable (ConnectError)")
    assert sorted(second.moved) == sorted(orphans)
    placed = fleet.db.placements()
    assert all(dead not in urls and len(urls) == 2 for urls in placed.values())
    for customer in orphans:
        for url in placed[customer]:
            assert customer in fleet.held[url]

    fleet.up.add(dead)  # it restarts empty
    fleet.held[dead] = set()
    back = keeper.tick()
    assert back.rejoined == [dead]
    assert fleet.db.replicas()[0].state == ACTIVE
    placed = fleet.db.placements()
    returned = [c for c, urls in placed.items() if dead in urls]
    assert returned
    assert sorted(returned) == sorted(fleet.held[dead])
    assert {c: set(urls) for c, urls in placed.items()} == holders(fleet)


def test_a_copy_that_fails_its_load_keeps_the_old_placement(fleet: MemoryFleet) -> None:
    keeper = controller(fleet)
    keeper.tick()
    before = fleet.db.placements()
    dead = URLS[0]
    victim = next(c for c, urls in before.items() if dead in urls)
    target = next(url for url in URLS if url not in before[victim])
    fleet.broken_loads.add((target, victim))
    fleet.up.discard(dead)
    keeper.tick()
    tick = keeper.tick()
    assert "unreachable" in tick.failed[victim]
    assert fleet.db.placements()[victim] == before[victim]  # nothing recorded half-way
    assert victim not in fleet.held[target]
    fleet.broken_loads.clear()
    assert victim in keeper.tick().moved  # tried again at the next tick, not after replan_s


def test_only_the_lease_holder_acts(fleet: MemoryFleet) -> None:
    with fleet.db.deploy_lock(LEASE, "another gateway"):
        tick = controller(fleet).tick()
    assert not tick.acted
    assert fleet.db.placements() == {}
    assert controller(fleet).tick().acted  # released: the next one acts


def test_a_deploy_in_progress_keeps_its_customer_out_of_a_rebalance(fleet: MemoryFleet) -> None:
    with fleet.db.deploy_lock("c03", "a deploy"):
        tick = controller(fleet).tick()
    assert "already running (a deploy)" in tick.failed["c03"]
    assert "c03" not in fleet.db.placements()
    assert len(tick.moved) == len(CUSTOMERS) - 1


def test_a_hot_customer_gets_more_copies_and_falls_back_when_cold(fleet: MemoryFleet) -> None:
    counts: dict[str, int] = {}

    def traffic() -> Mapping[str, int]:
        taken = dict(counts)
        counts.clear()
        return taken

    keeper = controller(fleet, traffic=traffic, hot_requests_per_s=5.0)  # clock: 1 s a tick
    keeper.tick()
    assert len(fleet.db.placements()["c05"]) == 2
    counts.update({"c05": 40, "tiny-llama": 100})  # a base model is never a customer
    tick = keeper.tick()
    assert len(fleet.db.placements()["c05"]) == 3 == len(holders(fleet)["c05"])
    assert tick.moved == ["c05"]
    for _ in range(3):  # no traffic: the smoothed rate halves each tick
        keeper.tick()
    assert len(fleet.db.placements()["c05"]) == 2 == len(holders(fleet)["c05"])


def test_moves_per_tick_are_bounded(fleet: MemoryFleet) -> None:
    keeper = controller(fleet, max_moves=5)
    assert len(keeper.tick().moved) == 5
    assert len(keeper.tick().moved) == 5
    assert len(keeper.tick().moved) == 2
    assert keeper.tick().moved == []


def test_a_replica_joining_or_leaving_is_planned_for_at_once(fleet: MemoryFleet) -> None:
    keeper = controller(fleet, replan_s=3600)
    keeper.tick()
    assert keeper.tick().moved == []  # nothing changed, and the next replan is an hour away
    fleet.db.remove_replica(URLS[2])
    fleet.up.discard(URLS[2])
    moved = keeper.tick().moved
    assert moved
    assert all(URLS[2] not in urls for urls in fleet.db.placements().values())
    fleet.db.add_replica(URLS[2], "tiny-llama", LLAMA)
    fleet.up.add(URLS[2])
    assert keeper.tick().moved
    assert any(URLS[2] in urls for urls in fleet.db.placements().values())


def test_a_new_leading_copy_is_recorded_without_loading_anything(fleet: MemoryFleet) -> None:
    ticker = controller(fleet, replan_s=0.0)  # every tick re-plans
    ticker.tick()
    placed = fleet.db.placements()
    customer = CUSTOMERS[0]
    fleet.db.place(customer, LLAMA, placed[customer][::-1])  # as an older planner ordered it
    fleet.calls.clear()
    ticker.tick()
    assert fleet.db.placements()[customer] == placed[customer]
    assert fleet.calls == []


def test_a_removed_replica_hands_its_customers_over_under_the_fleet_lease(
    fleet: MemoryFleet,
) -> None:
    controller(fleet).tick()
    leaving = URLS[0]
    theirs = [c for c, urls in fleet.db.placements().items() if leaving in urls]
    with (
        fleet.db.deploy_lock(LEASE, "a gateway's tick"),
        pytest.raises(DeployInProgress, match="re-planned by another process"),
    ):
        drain(fleet, Versions(CUSTOMERS), leaving, k=2, wait_s=0)  # type: ignore[arg-type]
    assert leaving in fleet.urls()  # nothing done while another held the lease
    done = drain(fleet, Versions(CUSTOMERS), leaving, k=2)  # type: ignore[arg-type]
    assert sorted(change.customer for change in done.applied) == sorted(theirs)
    assert leaving not in fleet.urls()
    placed = fleet.db.placements()
    for customer in theirs:
        assert leaving not in placed[customer]
        assert len(placed[customer]) == 2
        assert all(customer in fleet.held[url] for url in placed[customer])
