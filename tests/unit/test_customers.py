"""Customer records on a real SQLite file: refusals at the door, then the happy paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lora_ops import customers
from lora_ops.config import TrainConfig
from lora_ops.customers import CustomerSpec
from lora_ops.db import Database
from lora_ops.errors import InputError


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'service.db'}")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "acme.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return path


def good(data: Path, **changes: Any) -> dict[str, Any]:
    return {"id": "acme", "data_uri": str(data), **changes}


# (field the refusal must name, values replacing the good ones)
BAD_INPUTS = {
    "id-with-dots": ("id", {"id": "../x"}),
    "id-uppercase": ("id", {"id": "Acme"}),
    "id-with-space": ("id", {"id": "a b"}),
    "id-200-chars": ("id", {"id": "a" * 200}),
    "id-empty": ("id", {"id": ""}),
    "id-missing": ("id", {"id": None}),
    "data-missing-file": ("data_uri", {"data_uri": "/no/such/file.jsonl"}),
    "data-a-folder": ("data_uri", {"data_uri": "/tmp"}),
    "data-s3-dotdot": ("data_uri", {"data_uri": "s3://lora-ops/data/../secrets.jsonl"}),
    "data-s3-folder": ("data_uri", {"data_uri": "s3://lora-ops/data/"}),
    "data-other-scheme": ("data_uri", {"data_uri": "https://example.com/a.jsonl"}),
    "base-unknown": ("base_model", {"base_model": "gpt-17"}),
    "training-rank-0": ("training.lora.r", {"training": {"lora": {"r": 0}}}),
    "training-negative-lr": ("training.learning_rate", {"training": {"learning_rate": -1}}),
    "training-unknown-key": ("training.nope", {"training": {"nope": 1}}),
    "training-unknown-lora-key": ("training.lora.rank", {"training": {"lora": {"rank": 8}}}),
    "training-not-a-dict": ("training", {"training": "r=8"}),
    "schedule-minute-61": ("schedule", {"schedule": "61 * * * *"}),
    "schedule-words": ("schedule", {"schedule": "every day"}),
    "schedule-six-fields": ("schedule", {"schedule": "0 0 3 * * *"}),
    "timezone-unknown": ("timezone", {"timezone": "Mars/Olympus"}),
    "timezone-path": ("timezone", {"timezone": "../../etc/passwd"}),
    "min-improvement-1.5": ("min_improvement", {"min_improvement": 1.5}),
    "tolerance-negative": ("production_tolerance", {"production_tolerance": -0.1}),
    "display-name-blank": ("display_name", {"display_name": "   "}),
    "display-name-201": ("display_name", {"display_name": "x" * 201}),
    "unknown-field": ("colour", {"colour": "blue"}),
    "validation-missing-file": ("validation_data_uri", {"validation_data_uri": "/no/such.jsonl"}),
    "validation-a-folder": ("validation_data_uri", {"validation_data_uri": "/tmp"}),
    "validation-s3-folder": ("validation_data_uri", {"validation_data_uri": "s3://lora-ops/v/"}),
    "validation-other-scheme": (
        "validation_data_uri",
        {"validation_data_uri": "https://example.com/v.jsonl"},
    ),
    "training-epochs-words": ("training.epochs", {"training": {"epochs": "lots"}}),
    "training-eval-every-0": ("training.eval_every", {"training": {"eval_every": 0}}),
    "training-patience-alone": (
        "training.early_stopping_patience",
        {"training": {"early_stopping_patience": 3}},
    ),
    "training-warm-start-latest": ("training.warm_start", {"training": {"warm_start": "latest"}}),
}


@pytest.mark.parametrize(("field", "bad"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(
    db: Database, data: Path, field: str, bad: dict[str, Any]
) -> None:
    values = {name: value for name, value in good(data, **bad).items() if value is not None}
    with pytest.raises(InputError) as refused:
        customers.add(CustomerSpec(**values), db=db)
    assert refused.value.field == field
    assert refused.value.reason
    assert customers.list_customers(db=db) == []


def test_refusals_say_what_is_wrong(data: Path) -> None:
    with pytest.raises(InputError, match=r"schedule: '61 \* \* \* \*' is not a cron schedule"):
        CustomerSpec(**good(data, schedule="61 * * * *"))
    with pytest.raises(InputError, match="training.lora.r: must be a whole number >= 1, got 0"):
        CustomerSpec(**good(data, training={"lora": {"r": 0}}))
    with pytest.raises(InputError, match="'gpt-17' is neither a catalogue model"):
        CustomerSpec(**good(data, base_model="gpt-17"))


def test_a_bad_update_writes_nothing(db: Database, data: Path) -> None:
    before = customers.add(CustomerSpec(**good(data, schedule="0 3 * * *")), db=db)
    with pytest.raises(InputError) as refused:
        customers.update("acme", db=db, display_name="Acme Corp", training={"lora": {"r": 0}})
    assert refused.value.field == "training.lora.r"
    assert customers.get("acme", db=db) == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "globex"}, "id"),
        ({"colour": "blue"}, "colour"),
        ({"schedule": "every day"}, "schedule"),
        ({"data_uri": "/no/such/file.jsonl"}, "data_uri"),
    ],
    ids=["rename", "unknown-field", "bad-schedule", "missing-file"],
)
def test_update_refuses_bad_changes(
    db: Database, data: Path, changes: dict[str, Any], field: str
) -> None:
    customers.add(CustomerSpec(**good(data)), db=db)
    with pytest.raises(InputError) as refused:
        customers.update("acme", db=db, **changes)
    assert refused.value.field == field


def test_unknown_customers_are_refused_by_name(db: Database) -> None:
    for call in (customers.get, customers.remove, customers.update):
        with pytest.raises(InputError, match="no customer 'ghost'"):
            call("ghost", db=db)
    assert customers.find("ghost", db=db) is None
    with pytest.raises(InputError) as refused:
        customers.get("../etc", db=db)
    assert refused.value.field == "customer"


def test_adding_an_existing_id_is_refused(db: Database, data: Path) -> None:
    first = customers.add(CustomerSpec(**good(data)), db=db)
    with pytest.raises(InputError, match="customer acme already exists; use `lora-ops customers"):
        customers.add(CustomerSpec(**good(data, display_name="Other")), db=db)
    assert customers.list_customers(db=db) == [first]


def test_add_then_get_returns_the_spec_with_defaults(db: Database, data: Path) -> None:
    spec = CustomerSpec(**good(data, training={"lora": {"r": 16}}))
    added = customers.add(spec, db=db)
    got = customers.get("acme", db=db)
    assert got == added
    assert got.spec == spec
    assert got.display_name == "acme"
    assert got.base_model == "smollm2-135m-instruct"
    assert (got.min_improvement, got.production_tolerance) == (0.05, 0.02)
    assert (got.schedule, got.timezone) == (None, "UTC")
    assert (got.auto_deploy, got.require_review, got.active) == (False, False, True)
    assert got.training == {"lora": {"r": 16}}
    assert got.created_at == got.updated_at


def test_list_is_ordered_by_id_and_can_skip_inactive(db: Database, data: Path) -> None:
    for customer_id, active in (("zeta", True), ("acme", False), ("beta-2", True)):
        customers.add(CustomerSpec(**good(data, id=customer_id, active=active)), db=db)
    assert [r.id for r in customers.list_customers(db=db)] == ["acme", "beta-2", "zeta"]
    assert [r.id for r in customers.list_customers(active_only=True, db=db)] == ["beta-2", "zeta"]


def test_update_merges_training_clears_schedule_and_moves_updated_at(
    db: Database, data: Path
) -> None:
    added = customers.add(
        CustomerSpec(
            **good(
                data,
                training={"lora": {"r": 16, "alpha": 32}, "max_steps": 60},
                schedule="0 3 * * *",
                timezone="Europe/Paris",
            )
        ),
        db=db,
    )
    updated = customers.update(
        "acme",
        db=db,
        training={"lora": {"alpha": 64}, "learning_rate": "2e-3"},
        schedule=None,
        display_name="  Acme Corp  ",
    )
    assert updated.training == {
        "lora": {"r": 16, "alpha": 64.0},
        "max_steps": 60,
        "learning_rate": 0.002,
    }
    assert updated.schedule is None
    assert updated.timezone == "Europe/Paris"
    assert updated.display_name == "Acme Corp"
    assert updated.created_at == added.created_at
    assert updated.updated_at > added.updated_at
    assert customers.get("acme", db=db) == updated


def test_update_does_not_recheck_a_data_file_that_moved(db: Database, data: Path) -> None:
    customers.add(CustomerSpec(**good(data)), db=db)
    data.unlink()
    assert customers.update("acme", db=db, active=False).active is False


def test_remove_deletes_the_record(db: Database, data: Path) -> None:
    customers.add(CustomerSpec(**good(data)), db=db)
    customers.remove("acme", db=db)
    assert customers.find("acme", db=db) is None
    assert customers.list_customers(db=db) == []


def test_a_relative_data_path_is_stored_absolute(
    db: Database, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(data.parent)
    record = customers.add(CustomerSpec(id="acme", data_uri=data.name), db=db)
    assert record.data_uri == str(data.resolve())
    assert os.path.isabs(customers.get("acme", db=db).data_uri)


def test_s3_data_and_a_local_base_folder_are_accepted(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    spec = CustomerSpec(id="acme", data_uri="s3://lora-ops/raw/acme.jsonl", base_model="my-base")
    record = customers.add(spec, db=db)
    assert record.data_uri == "s3://lora-ops/raw/acme.jsonl"
    assert record.base_model == str(base.resolve())


def test_retrain_parameters_round_trip_into_the_train_config(db: Database, data: Path) -> None:
    customers.add(
        CustomerSpec(
            **good(
                data,
                base_model="tiny-llama",
                training={"lora": {"r": 16, "alpha": 32}, "learning_rate": 0.002, "max_steps": 60},
                min_improvement=0.1,
                auto_deploy=True,
            )
        ),
        db=db,
    )
    parameters = customers.retrain_parameters(customers.get("acme", db=db))
    config = TrainConfig.model_validate(parameters.pop("config"))
    assert (config.lora.r, config.lora.alpha) == (16, 32.0)
    assert (config.learning_rate, config.max_steps) == (0.002, 60)
    assert config.batch_size == TrainConfig().batch_size
    assert parameters == {
        "customer": "acme",
        "data_uri": str(data.resolve()),
        "validation_data_uri": None,
        "base": "tiny-llama",
        "min_improvement": 0.1,
        "production_tolerance": 0.02,
        "auto_deploy": True,
        "require_review": False,
    }


def test_merge_overrides_is_nested_and_leaves_its_inputs_alone() -> None:
    base = {"lora": {"r": 8, "alpha": 16.0}, "max_steps": None}
    merged = customers.merge_overrides(base, {"lora": {"r": 4}, "max_steps": 3})
    assert merged == {"lora": {"r": 4, "alpha": 16.0}, "max_steps": 3}
    assert base == {"lora": {"r": 8, "alpha": 16.0}, "max_steps": None}


def test_steering_and_warm_start_refusals_say_what_is_wrong(data: Path) -> None:
    with pytest.raises(InputError, match=r"validation_data_uri: '/no/such.jsonl' is not a file"):
        CustomerSpec(**good(data, validation_data_uri="/no/such.jsonl"))
    with pytest.raises(InputError, match=r"training.epochs: must be a whole number .* or 'auto'"):
        CustomerSpec(**good(data, training={"epochs": "lots"}))
    with pytest.raises(InputError, match=r"early_stopping_patience: .* set eval_every too"):
        CustomerSpec(**good(data, training={"early_stopping_patience": 3}))
    with pytest.raises(InputError, match=r"warm_start: the only adapter .* is 'production'"):
        CustomerSpec(**good(data, training={"warm_start": "v3"}))


def test_validation_data_and_steering_reach_the_retrain_parameters(
    db: Database, data: Path, tmp_path: Path
) -> None:
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(data.read_text())
    training = {
        "epochs": "auto",
        "eval_every": 5,
        "early_stopping_patience": 2,
        "warm_start": "production",
    }
    spec = CustomerSpec(**good(data, validation_data_uri=str(held_out), training=training))
    record = customers.add(spec, db=db)
    assert customers.get("acme", db=db).validation_data_uri == str(held_out.resolve())
    parameters = customers.retrain_parameters(record)
    assert parameters["validation_data_uri"] == str(held_out.resolve())
    config = TrainConfig.model_validate(parameters["config"])
    assert (config.epochs, config.eval_every, config.early_stopping_patience) == ("auto", 5, 2)
    assert config.warm_start == "production"
    cleared = customers.update("acme", db=db, validation_data_uri=None)
    assert cleared.validation_data_uri is None
