"""Replicas' declared bases and states, and customers' placements, in the service database."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_ops.db import ACTIVE, DOWN, Database

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'fleet.db'}")


def test_a_replica_declares_its_base_and_starts_in_rotation(db: Database) -> None:
    db.add_replica(A, "smollm2-135m-instruct", "a" * 64)
    db.add_replica(B)  # a replica whose base is not known yet
    (first, second) = db.replicas()
    assert (first.url, first.base, first.base_sha256, first.state) == (
        A, "smollm2-135m-instruct", "a" * 64, ACTIVE,
    )  # fmt: skip
    assert (second.base_sha256, second.state) == (None, ACTIVE)

    db.add_replica(B, "tiny-llama", "b" * 64)  # declared later: recorded
    db.add_replica(A)  # added again without a base: what it declared stays
    assert [(r.url, r.base_sha256) for r in db.replicas()] == [(A, "a" * 64), (B, "b" * 64)]


def test_draining_a_replica_and_back(db: Database) -> None:
    db.add_replica(A)
    assert db.set_replica_state(A, DOWN, "health check: connection refused")
    assert not db.set_replica_state(A, DOWN)  # no change
    (row,) = db.replicas()
    assert (row.state, row.state_detail) == (DOWN, "health check: connection refused")
    assert row.state_since is not None
    assert db.set_replica_state(A, ACTIVE)
    with pytest.raises(ValueError, match="active or down"):
        db.set_replica_state(A, "sleepy")


def test_placements_replace_a_customer_s_replicas_and_keep_their_order(db: Database) -> None:
    for url in (A, B, C):
        db.add_replica(url, "tiny-llama", "b" * 64)
    db.place("acme", "b" * 64, [C, A])
    db.place("globex", "b" * 64, [B, C])
    assert db.placements() == {"acme": [C, A], "globex": [B, C]}

    db.place("acme", "b" * 64, [B])
    assert db.placements()["acme"] == [B]

    assert db.remove_replica(C)  # its placements go with it
    assert db.placements() == {"acme": [B], "globex": [B]}


def test_a_replica_added_while_down_has_its_base_learned_when_it_answers(db: Database) -> None:
    from lora_ops.fleet import Fleet
    from tests.gateway.fakes import FakeReplica, answer

    declared = {"status": "ok", "base": "tiny-llama", "base_sha256": "c" * 64}
    with FakeReplica(answer(200, declared)) as replica:
        db.add_replica(replica.url)  # as `fleet add` leaves one it could not reach
        silent = "http://127.0.0.1:9"  # discard port: nothing answers
        db.add_replica(silent)
        Fleet(db).learn_bases()
    bases = {r.url: (r.base, r.base_sha256) for r in db.replicas()}
    assert bases[replica.url] == ("tiny-llama", "c" * 64)
    assert bases[silent] == (None, None)
