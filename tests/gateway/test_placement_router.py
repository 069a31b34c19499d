"""The gateway's router over the database's placement: customers to their replicas, drained
replicas out, the base model by name, a database that cannot be read leaves the last table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_ops.db import DOWN, Database
from lora_ops.gateway.load import Load
from lora_ops.gateway.placement_router import PlacementRouter

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"
OTHER = "http://10.0.0.9:8000"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    for url in (A, B, C):
        database.add_replica(url, "tiny-llama", "a" * 64)
    database.place("acme", "a" * 64, [B, C])
    database.place("globex", "a" * 64, [A, B])
    return database


def test_a_customer_goes_to_its_first_placed_replica_until_it_is_busy(db: Database) -> None:
    load = Load()
    router = PlacementRouter(db, load=load, spill_margin=1)
    assert router.candidates("acme") == [B, C]
    load.begin(B)
    assert router.candidates("acme") == [B, C]
    load.begin(B)
    assert router.candidates("acme") == [C, B]
    load.end(B)
    load.end(B)
    assert router.candidates("nobody") == []
    assert set(router.models()) == {"acme", "globex", "tiny-llama", "base"}
    assert router.candidates("base") == router.candidates("tiny-llama") == [A, B, C]


def test_a_drained_replica_leaves_the_table_at_the_next_refresh(db: Database) -> None:
    router = PlacementRouter(db)
    db.set_replica_state(C, DOWN, "health check failed")
    assert router.candidates("acme") == [B, C]  # not read yet
    router.refresh()
    assert router.candidates("acme") == [B]


def test_with_two_bases_base_is_not_a_model(db: Database) -> None:
    db.add_replica(OTHER, "smollm2-135m-instruct", "b" * 64)
    router = PlacementRouter(db)
    assert router.candidates("base") == []
    assert router.candidates("smollm2-135m-instruct") == [OTHER]


def test_a_failed_read_keeps_the_last_table(db: Database, tmp_path: Path) -> None:
    router = PlacementRouter(db)
    db.engine.dispose()
    (tmp_path / "fleet.db").unlink()
    (tmp_path / "fleet.db").mkdir()  # the file is now a folder: reads fail
    router.refresh()
    assert router.candidates("acme") == [B, C]
