"""Deploys to a fleet of two real replicas: all or nothing, rollback, self-converging replicas."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_ops import base_models, names
from lora_ops.config import TrainConfig
from lora_ops.db import Database, DeployInProgress
from lora_ops.fleet import Fleet
from lora_ops.fleet.rollout import DeployFailed, deploy, rollback
from lora_ops.lora import LoraSpec
from lora_ops.registry import Registry
from lora_ops.registry.tags import SMOKE_OUTPUT_TAG
from tests.integration.conftest import free_port
from tests.processes import ReplicaProcess

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
TOKEN = "fleet-admin-token-for-tests"
CUSTOMER = "deploy-co"


@pytest.fixture(scope="module")
def versions(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two registered versions of the customer: version -> its recorded smoke answer."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("data")
    smoke = {}
    for version, (lines, lr, steps) in enumerate(
        [(slice(0, 40), 1e-2, 4), (slice(40, 80), 1e-2, 16)], 1
    ):
        data = root / f"v{version}.jsonl"
        data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[lines]))
        config = TrainConfig(
            lora=LoraSpec(r=8, alpha=16),
            learning_rate=lr,
            max_steps=steps,
            batch_size=4,
            max_seq_len=256,
            eval_fraction=0.2,
        )
        result = retrain(
            customer=CUSTOMER,
            data_uri=str(data),
            base="tiny-llama",
            config=config,
            min_improvement=0.0,
            production_tolerance=0.99,
        )
        assert result["version"] == str(version)
        smoke[str(version)] = Registry().get_version(CUSTOMER, version).tags[SMOKE_OUTPUT_TAG]
    return smoke


@pytest.fixture(scope="module")
def fleet(
    stack: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Fleet, list[ReplicaProcess]]]:
    os.environ["LORA_OPS_ADMIN_TOKEN"] = TOKEN
    logs = tmp_path_factory.mktemp("replicas")
    replicas = [ReplicaProcess(free_port(), logs / f"r{i}.log", TOKEN) for i in range(2)]
    try:
        for replica in replicas:
            replica.start()
        fleet = Fleet(Database(), admin_token=TOKEN)
        for replica in replicas:
            fleet.add(replica.url)
        yield fleet, replicas
    finally:
        for replica in replicas:
            replica.kill()
            Fleet(Database(), admin_token=TOKEN).remove(replica.url)  # the next module's fleet
        os.environ.pop("LORA_OPS_ADMIN_TOKEN", None)


def serves(fleet: Fleet, url: str, versions: dict[str, str]) -> str | None:
    """The version ``url`` serves the customer (its smoke answer checked), or None."""
    source = fleet.served_from(url).get(CUSTOMER)
    if source is None:
        return None
    version = source.rsplit("/", 1)[1]
    assert fleet.smoke(url, CUSTOMER) == versions[version]
    return version


def test_deploy_failure_rollback_and_restart(
    versions: dict[str, str], fleet: tuple[Fleet, list[ReplicaProcess]]
) -> None:
    client, replicas = fleet
    registry = Registry()
    first = deploy(CUSTOMER, "1", fleet=client)
    assert first.previous is None
    assert [serves(client, r.url, versions) for r in replicas] == ["1", "1"]
    assert registry.get_aliases(CUSTOMER)[names.PRODUCTION] == "1"

    replicas[1].kill()
    with pytest.raises(DeployFailed, match=f"replica {replicas[1].url}: unreachable"):
        deploy(CUSTOMER, "2", fleet=client)
    assert serves(client, replicas[0].url, versions) == "1"
    assert registry.get_aliases(CUSTOMER)[names.PRODUCTION] == "1"
    history = client.db.deployments(CUSTOMER)
    assert {row.status for row in history if row.version == "2"} == {"failed"}

    replicas[1].start()  # a restarted replica loads production by itself
    assert serves(client, replicas[1].url, versions) == "1"

    second = deploy(CUSTOMER, "2", fleet=client)
    assert second.previous == "1"
    assert [serves(client, r.url, versions) for r in replicas] == ["2", "2"]
    assert registry.get_aliases(CUSTOMER) | {} == {
        "candidate": "2",
        "production": "2",
        "previous": "1",
    }

    back = rollback(CUSTOMER, fleet=client)
    assert back.version == "1"
    assert [serves(client, r.url, versions) for r in replicas] == ["1", "1"]
    assert registry.get_aliases(CUSTOMER)[names.PRODUCTION] == "1"
    assert registry.get_aliases(CUSTOMER)[names.PREVIOUS] == "2"


def test_two_deploys_of_one_customer_never_overlap(
    versions: dict[str, str], fleet: tuple[Fleet, list[ReplicaProcess]]
) -> None:
    client, _ = fleet
    with (
        client.db.deploy_lock(CUSTOMER, "someone else"),
        pytest.raises(DeployInProgress, match="already running \\(someone else\\)"),
    ):
        deploy(CUSTOMER, "2", fleet=client)
    with client.db.deploy_lock("other-customer", "parallel deploy"):
        assert deploy(CUSTOMER, "2", fleet=client).version == "2"  # other customers don't block


def test_retrain_with_auto_deploy_ends_in_production(
    versions: dict[str, str], fleet: tuple[Fleet, list[ReplicaProcess]], tmp_path: Path
) -> None:
    from flows.retrain import retrain

    client, replicas = fleet
    data = tmp_path / "v3.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[80:120]))
    config = TrainConfig(
        lora=LoraSpec(r=8, alpha=16),
        learning_rate=1e-2,
        max_steps=4,
        batch_size=4,
        max_seq_len=256,
        eval_fraction=0.2,
    )
    result = retrain(
        customer=CUSTOMER,
        data_uri=str(data),
        base="tiny-llama",
        config=config,
        min_improvement=0.0,
        production_tolerance=0.99,
        auto_deploy=True,
    )
    assert result["deployed"]["version"] == result["version"] == "3"
    assert Registry().get_aliases(CUSTOMER)[names.PRODUCTION] == "3"
    for replica in replicas:
        assert client.served_from(replica.url)[CUSTOMER].endswith("/3")


def test_fleet_cli_lists_replicas_with_health(fleet: tuple[Fleet, list[ReplicaProcess]]) -> None:
    from typer.testing import CliRunner

    from lora_ops.cli import app

    _, replicas = fleet
    runner = CliRunner()
    sha256 = base_models.base_sha256(base_models.resolve_base("tiny-llama"))
    Database().place("listed-co", sha256, [replicas[1].url])
    # The table fits the terminal (cells wrap), but never breaks a replica's URL.
    listing = runner.invoke(app, ["fleet", "list"])
    assert listing.exit_code == 0, listing.output
    assert all(replica.url in listing.output for replica in replicas)
    listed = json.loads(runner.invoke(app, ["fleet", "list", "--json"]).output)
    by_url = {row["url"]: row for row in listed}
    assert "listed-co" in by_url[replicas[1].url]["placed"]
    assert "listed-co" not in by_url[replicas[0].url]["placed"]
    assert all(by_url[r.url]["base_sha256"] == sha256 for r in replicas)
    assert all(by_url[r.url]["state"] == "active" and by_url[r.url]["healthy"] for r in replicas)
    bad = runner.invoke(app, ["fleet", "add", "ftp://nope"])
    assert "is not an http(s)://host:port URL" in str(bad.exception)
    # Registered replicas declared their base; one that cannot be reached is added unknown.
    again = runner.invoke(app, ["fleet", "add", replicas[0].url])
    assert f"added {replicas[0].url} (base tiny-llama, sha256 " in again.output
    declared = {r.url: (r.base, r.base_sha256) for r in Database().replicas()}
    assert all(declared[r.url] == ("tiny-llama", sha256) for r in replicas)
    extra = f"http://127.0.0.1:{free_port()}"
    added = runner.invoke(app, ["fleet", "add", extra])
    assert added.exit_code == 0
    assert "its base is not known yet" in added.output
    listed = json.loads(runner.invoke(app, ["fleet", "list", "--json"]).output)
    (unreachable,) = [row for row in listed if row["url"] == extra]
    assert "Connection refused" in unreachable["health"]
    assert unreachable["base"] is None
    assert runner.invoke(app, ["fleet", "remove", extra]).exit_code == 0
    assert extra not in Fleet(Database()).urls()
