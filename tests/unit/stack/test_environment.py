"""The variables a part runs with and those ``stack env`` prints: keys where they belong."""

from __future__ import annotations

import csv
import shlex

import pytest
from pydantic import SecretStr

from lora_ops.settings import Settings
from lora_ops.stack import environment, state
from lora_ops.stack.parts import StackError


def test_rclones_key_pair_stays_one_csv_value(settings: Settings) -> None:
    value = environment.rclone_auth_key(settings)
    key = settings.aws_access_key_id.get_secret_value()
    secret = settings.aws_secret_access_key.get_secret_value()
    assert next(csv.reader([value])) == [f"{key},{secret}"]


def test_a_comma_in_the_s3_keys_is_refused(settings: Settings) -> None:
    with_comma = settings.model_copy(update={"aws_secret_access_key": SecretStr("a,b")})
    with pytest.raises(StackError, match="must not contain a comma"):
        environment.rclone_auth_key(with_comma)


def test_the_admin_token_is_made_once_readable_by_its_owner_only(settings: Settings) -> None:
    folder = state.state_dir(settings)
    assert environment.stored_admin_token(settings, folder) is None
    token = environment.admin_token(settings, folder)
    assert environment.admin_token(settings, folder) == token
    assert (folder / environment.ADMIN_TOKEN_FILE).stat().st_mode & 0o777 == 0o600


def test_a_configured_admin_token_wins(settings: Settings) -> None:
    configured = settings.model_copy(update={"admin_token": SecretStr("configured")})
    folder = state.state_dir(configured)
    assert environment.admin_token(configured, folder) == "configured"
    assert not (folder / environment.ADMIN_TOKEN_FILE).exists()


def test_recorded_ports_win_over_the_settings(settings: Settings) -> None:
    folder = state.state_dir(settings)
    folder.mkdir(parents=True)
    state.write_records(folder, {"mlflow": {"pid": 1, "port": 5999}})
    env = environment.service_env(settings)
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert env["LORA_OPS_MLFLOW_PORT"] == "5999"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert "LORA_OPS_ADMIN_TOKEN" not in env


def test_env_lines_quote_each_value(settings: Settings) -> None:
    odd = settings.model_copy(update={"bucket": "a bucket; rm -rf"})
    lines = environment.env_lines(odd)
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)
    assert exported["LORA_OPS_BUCKET"] == "a bucket; rm -rf"


def test_the_servers_get_only_their_own_keys(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "someone-elses")
    monkeypatch.setenv("NO_PROXY", "corp.example")
    s3 = environment.child_env("s3", settings, state.state_dir(settings))
    prefect = environment.child_env("prefect", settings, state.state_dir(settings))
    assert "AWS_SESSION_TOKEN" not in s3
    assert "AWS_SECRET_ACCESS_KEY" not in s3
    assert "RCLONE_AUTH_KEY" not in prefect
    assert s3["NO_PROXY"] == s3["no_proxy"] == "corp.example,127.0.0.1,localhost"
    assert prefect["PREFECT_HOME"] == str(state.state_dir(settings) / "prefect")
