"""Customer records, the database commands and the pipeline's use of a record, at the CLI
(SQLite in a temporary state folder; the commands that need servers are in integration/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from lora_ops import customers
from lora_ops.cli import app
from lora_ops.cli.common import out
from lora_ops.db import Database

SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
runner = CliRunner()


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of our own, so the service database is a fresh SQLite file."""
    for name in ("LORA_OPS_DATABASE_URL", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORA_OPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(out, "width", 200)  # tables unwrapped, as on a wide terminal
    return tmp_path / "state"


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args), terminal_width=200)


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.output}{result.exception!r}"
    return result.output


def refused(*args: str) -> str:
    """The message of the InputError a command stops with (exit code 2 at the console)."""
    result = invoke(*args)
    assert result.exit_code != 0
    return str(result.exception)


def test_add_list_update_remove(tmp_path: Path) -> None:
    added = ok("customers", "add", "acme", "--name", "Acme Anvils", "--data", str(SAMPLE),
               "--rank", "16", "--lr", "2e-3", "--schedule", "0 3 * * *",
               "--timezone", "Europe/Paris", "--auto-deploy")  # fmt: skip
    assert "added acme (Acme Anvils)" in added
    assert "schedule sync" in added
    record = customers.get("acme")
    assert record.training == {"lora": {"r": 16}, "learning_rate": 0.002}
    assert (record.schedule, record.timezone, record.auto_deploy) == (
        "0 3 * * *",
        "Europe/Paris",
        True,
    )
    listing = ok("customers", "list")
    assert "acme" in listing
    assert "0 3 * * * (Europe/Paris)" in listing
    assert "auto" in listing

    ok("customers", "update", "acme", "--alpha", "32", "--no-schedule", "--require-review")
    updated = customers.get("acme")
    assert updated.training == {"lora": {"r": 16, "alpha": 32.0}, "learning_rate": 0.002}
    assert updated.schedule is None
    assert updated.require_review is True
    assert updated.created_at == record.created_at
    assert updated.updated_at > record.updated_at

    assert "nothing to change" in refused("customers", "update", "acme")
    both = refused("customers", "update", "acme", "--schedule", "* * * * *", "--no-schedule")
    assert "not both" in both
    assert "removed acme" in ok("customers", "remove", "acme", "--yes")
    assert customers.find("acme") is None
    assert "no customer 'acme'" in refused("customers", "remove", "acme", "--yes")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["Bad Name"], "id: "),
        (["acme", "--schedule", "61 * * * *"], "schedule: '61 * * * *' is not a cron schedule"),
        (["acme", "--timezone", "Mars/Olympus"], "timezone: 'Mars/Olympus' is not an IANA"),
        (["acme", "--rank", "0"], "training.lora.r"),
        (["acme", "--base", "no-such-model"], "base_model: 'no-such-model' is neither"),
        (["acme", "--min-improvement", "1.5"], "min_improvement"),
    ],
    ids=["id", "cron", "timezone", "rank", "base", "gate"],
)
def test_bad_records_are_refused_and_nothing_is_written(args: list[str], expected: str) -> None:
    customer, *options = args
    message = refused("customers", "add", customer, "--data", str(SAMPLE), *options)
    assert expected in message
    assert customers.list_customers() == []


def test_a_missing_data_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert "is not a file" in refused("customers", "add", "acme", "--data", str(missing))


def test_add_twice_is_refused_unless_exist_ok() -> None:
    ok("customers", "add", "acme", "--data", str(SAMPLE))
    assert "already exists" in refused("customers", "add", "acme", "--data", str(SAMPLE))
    kept = ok("customers", "add", "acme", "--data", str(SAMPLE), "--rank", "4", "--exist-ok")
    assert "kept as it is" in kept
    assert customers.get("acme").training == {}


def test_pipeline_run_needs_data_or_a_record() -> None:
    message = refused("pipeline", "run", "--customer", "nobody")
    assert "nobody has no customer record" in message
    assert "--data" in message


def test_deploy_of_an_unapproved_version_is_refused_before_any_replica_is_touched() -> None:
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    from lora_ops.errors import InputError
    from lora_ops.fleet.rollout import _check_review
    from lora_ops.registry.review import PENDING
    from lora_ops.registry.tags import APPROVED_TAG, REVIEW_TAG

    def version(**tags: str) -> ModelVersion:
        pairs = [ModelVersionTag(key, value) for key, value in tags.items()]
        return ModelVersion("adapter-acme", "3", creation_timestamp=0, tags=pairs)

    ok("customers", "add", "acme", "--data", str(SAMPLE), "--require-review")
    with pytest.raises(InputError, match="version 3 needs a reviewer's approval"):
        _check_review(Database(), "acme", version(**{REVIEW_TAG: PENDING}))
    with pytest.raises(InputError, match="version 3 was rejected in review"):
        _check_review(Database(), "acme", version(**{APPROVED_TAG: "false"}))
    _check_review(Database(), "acme", version(**{APPROVED_TAG: "true"}))
    ok("customers", "update", "acme", "--no-require-review")
    _check_review(Database(), "acme", version())


def test_db_upgrade_and_status(state: Path) -> None:
    assert "applied 0001, 0002, 0003, 0004, 0005" in ok("db", "upgrade")
    assert "already at the newest schema" in ok("db", "upgrade")
    assert "revision 0005 (newest 0005)" in ok("db", "status")


def test_help_of_the_new_commands_runs_without_servers() -> None:
    for command in (["customers", "--help"], ["schedule", "--help"], ["worker", "--help"]):
        assert ok(*command)
    done = subprocess.run(
        [sys.executable, "-m", "lora_ops", "approve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--reject" in done.stdout
