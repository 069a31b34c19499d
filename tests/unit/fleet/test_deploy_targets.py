"""Which replicas a deploy goes to: the customer's placement among the active replicas of
the adapter's base, never a drained one, never one of another base."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_ops.db import DOWN, Database
from lora_ops.errors import InputError
from lora_ops.fleet.rollout import replicas_for

LLAMA, OTHER = "a" * 64, "b" * 64


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    for port in range(8001, 8005):
        database.add_replica(f"http://10.0.0.1:{port}", "tiny-llama", LLAMA)
    database.add_replica("http://10.0.0.2:8000", "other", OTHER)
    database.add_replica("http://10.0.0.3:8000")  # base not known: never a target
    return database


def test_a_customer_goes_to_two_replicas_of_its_base(db: Database) -> None:
    targets = replicas_for(db, "acme", LLAMA)
    assert len(targets) == len(set(targets)) == 2
    assert all(url.startswith("http://10.0.0.1:") for url in targets)
    assert replicas_for(db, "acme", LLAMA) == targets  # stable
    assert replicas_for(db, "globex", OTHER) == ["http://10.0.0.2:8000"]


def test_a_drained_replica_is_not_a_target(db: Database) -> None:
    targets = replicas_for(db, "acme", LLAMA)
    db.set_replica_state(targets[0], DOWN, "health check failed")
    again = replicas_for(db, "acme", LLAMA)
    assert targets[0] not in again
    assert targets[1] in again  # the other copy stays where it was


def test_no_replica_of_the_base_is_a_clear_refusal(db: Database) -> None:
    with pytest.raises(InputError, match="no replica in rotation serves adapter-acme's base"):
        replicas_for(db, "acme", "c" * 64)


def test_a_hot_customer_keeps_its_extra_copies(db: Database) -> None:
    usual = replicas_for(db, "acme", LLAMA)
    urls = [f"http://10.0.0.1:{port}" for port in range(8001, 8005)]
    db.place("acme", LLAMA, urls[:3])  # the fleet controller gave it a third copy
    targets = replicas_for(db, "acme", LLAMA)
    assert len(set(targets)) == 3
    assert set(usual) < set(targets)
    db.place("acme", LLAMA, usual)
    assert replicas_for(db, "acme", LLAMA) == usual
