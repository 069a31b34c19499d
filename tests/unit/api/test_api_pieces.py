"""The fine-tuning API's pure parts: OpenAI's hyperparameters, keys, webhook signatures."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from openai import OpenAI

from lora_ops.api.hyperparameters import train_config
from lora_ops.api.keys import Caller, Unauthenticated, caller_of, create_key
from lora_ops.api.schemas import JobCreate
from lora_ops.api.webhooks import Webhook, new_secret
from lora_ops.config import TrainConfig
from lora_ops.db import Database
from lora_ops.db.finetuning import FineTuningRecords
from lora_ops.db.models import FineTuningJob
from lora_ops.errors import InputError


def test_openai_names_map_to_the_train_config_and_extras_ride_along() -> None:
    base = TrainConfig(learning_rate=1e-4, lora={"r": 4, "alpha": 8})  # type: ignore[arg-type]
    config, resolved = train_config(
        {
            "n_epochs": 3,
            "batch_size": 2,
            "learning_rate_multiplier": 2.5,
            "max_steps": 9,
            "lora": {"r": 16},
        },
        base,
        seed=11,
        where="hyperparameters",
    )
    assert (config.epochs, config.batch_size, config.max_steps, config.seed) == (3, 2, 9, 11)
    assert config.learning_rate == pytest.approx(2.5e-4)
    assert (config.lora.r, config.lora.alpha) == (16, 8)  # a partial LoRA spec keeps the rest
    assert resolved == {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 2.5}
    auto, resolved = train_config({"n_epochs": "auto", "batch_size": "auto"}, base, 0, "h")
    assert (auto.epochs, auto.batch_size, auto.learning_rate) == ("auto", base.batch_size, 1e-4)
    assert resolved["learning_rate_multiplier"] == 1.0


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"warp": 1}, "method.supervised.hyperparameters.warp"),
        ({"learning_rate": 1}, "method.supervised.hyperparameters.learning_rate"),
        (
            {"learning_rate_multiplier": 0},
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"n_epochs": 0}, "method.supervised.hyperparameters.n_epochs"),
        ({"lora": {"r": 0}}, "method.supervised.hyperparameters.lora"),
    ],
)
def test_a_bad_hyperparameter_is_refused_by_its_name(hyperparameters: dict, field: str) -> None:
    with pytest.raises(InputError) as refused:
        train_config(hyperparameters, TrainConfig(), 0, "method.supervised.hyperparameters")
    assert refused.value.field == field


def test_only_supervised_and_one_place_for_hyperparameters() -> None:
    dpo = JobCreate(model="m", training_file="f", method={"type": "dpo"})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'dpo' is not offered"):
        dpo.hyperparameters_given()
    both = JobCreate(
        model="m",
        training_file="f",
        hyperparameters={},
        method={"type": "supervised"},  # type: ignore[arg-type]
    )
    with pytest.raises(InputError, match="only"):
        both.hyperparameters_given()
    with pytest.raises(ValueError, match="integrations"):
        JobCreate(model="m", training_file="f", integrations=[{"type": "wandb"}])


def test_keys_are_stored_hashed_and_name_their_customer(tmp_path: Path) -> None:
    records = FineTuningRecords(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    key = create_key(records, "acme")
    stored = records.keys("acme")
    assert len(stored) == 1
    assert key not in stored[0].sha256
    assert caller_of(f"Bearer {key}", "admin-token", records) == Caller("acme")
    assert caller_of("Bearer admin-token", "admin-token", records).is_admin
    for header in (None, "Basic x", "Bearer ", f"Bearer {key}x"):
        with pytest.raises(Unauthenticated):
            caller_of(header, "admin-token", records)
    records.revoke_key(stored[0].sha256[:12])
    with pytest.raises(Unauthenticated, match="revoked"):
        caller_of(f"Bearer {key}", None, records)


def test_openai_s_client_verifies_the_webhook_signature() -> None:
    secret = new_secret()
    job = FineTuningJob(id="ftjob-1", status="succeeded", finished_at=dt.datetime(2026, 12, 7))
    sent: list[tuple[bytes, dict[str, str]]] = []
    hook = Webhook("http://127.0.0.1:9/hooks", secret)
    body = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "created_at": 1,
            "type": "fine_tuning.job.succeeded",
            "data": {"id": job.id},
        }
    ).encode()
    import time

    headers = hook.headers(body, "evt_1", int(time.time()))
    sent.append((body, headers))
    event = OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(body, headers)
    assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", "ftjob-1")
    other = OpenAI(api_key="unused", webhook_secret=new_secret())
    with pytest.raises(Exception, match="signature"):
        other.webhooks.unwrap(body, headers)
    assert hook.send(job) is False  # nobody listens on port 9: not delivered, no exception
