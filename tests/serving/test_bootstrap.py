"""A replica converging on the registry: ready at once without one, loading once it answers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lora_ops.registry import Registry, RegistryUnavailable
from lora_ops.serving import bootstrap
from tests.servers import free_port


def test_an_unreachable_registry_is_reported_at_once() -> None:
    port = free_port()  # nothing listens there
    registry = Registry(f"http://127.0.0.1:{port}")
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port} is unreachable"):
        registry.check_reachable(timeout_s=5)


def test_a_store_that_is_no_server_is_always_reachable(tmp_path: Path) -> None:
    Registry(f"sqlite:///{tmp_path}/mlflow.db").check_reachable()


def test_ready_at_once_then_loads_when_the_registry_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([RegistryUnavailable("MLflow at X is unreachable"), None])
    events: list[str] = []

    def check_reachable(self: Registry, timeout_s: float = 3.0) -> None:
        answer = next(answers)
        events.append("asked")
        if answer is not None:
            raise answer

    def load(engine: object, base_model: str, only: set[str] | None = None) -> list[str]:
        events.append(f"loaded for {base_model}")
        return ["acme"]

    monkeypatch.setattr(Registry, "check_reachable", check_reachable)
    monkeypatch.setattr(bootstrap, "load_production_adapters", load)
    loaded = bootstrap.converge(
        object(),  # type: ignore[arg-type]
        "tiny-llama",
        lambda: events.append("ready"),
        retry_s=0,
    )
    assert loaded == ["acme"]
    assert events == ["asked", "ready", "asked", "loaded for tiny-llama", "ready"]


def test_a_stopped_replica_stops_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()

    def check_reachable(self: Registry, timeout_s: float = 3.0) -> None:
        stop.set()
        raise RegistryUnavailable("MLflow at X is unreachable")

    monkeypatch.setattr(Registry, "check_reachable", check_reachable)
    ready: list[bool] = []
    assert bootstrap.converge(object(), "b", lambda: ready.append(True), stop, 0) == []  # type: ignore[arg-type]
    assert ready == [True]
