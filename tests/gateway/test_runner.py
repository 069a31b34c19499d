"""``python -m lora_ops.gateway``: its options, and the model list it learns at start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_ops.gateway.__main__ import parse_args, served_models
from tests.gateway.fakes import FakeReplica, answer
from tests.servers import free_port


def models(*names: str) -> dict[str, object]:
    return {"object": "list", "data": [{"id": name, "object": "model"} for name in names]}


@pytest.mark.integration
def test_the_model_list_joins_what_each_replica_serves_and_skips_the_unreachable() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with (
        FakeReplica(answer(200, models("base", "acme"))) as first,
        FakeReplica(answer(200, models("base", "globex"))) as second,
    ):
        found = served_models([first.url, dead, second.url], "admin-token")
        assert first.received[0].header("authorization") == "Bearer admin-token"
    assert found == ["base", "acme", "globex"]


def test_replicas_repeat_and_the_rest_has_defaults() -> None:
    args = parse_args(["--replica", "http://a:1", "--replica", "http://b:2", "--port", "9000"])
    assert (args.replica, args.port, args.host) == (["http://a:1", "http://b:2"], 9000, "127.0.0.1")
    assert args.api_keys is None


def test_the_module_runs_and_explains_itself() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "lora_ops.gateway", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "--replica" in shown.stdout
