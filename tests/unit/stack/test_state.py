"""stack.json: written whole, read back with only the parts' records, refused when broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_ops.stack import state
from lora_ops.stack.parts import StackError


def test_records_written_are_read_back(tmp_path: Path) -> None:
    records = {"s3": {"pid": 12, "port": 9000, "url": "http://127.0.0.1:9000"}}
    state.write_records(tmp_path, records)
    assert state.read_records(tmp_path) == records
    assert [p.name for p in tmp_path.iterdir()] == [state.STATE_FILE]  # no temporary file left


def test_no_records_remove_the_state_file(tmp_path: Path) -> None:
    state.write_records(tmp_path, {"s3": {"pid": 12, "port": 9000}})
    state.write_records(tmp_path, {})
    assert not (tmp_path / state.STATE_FILE).exists()
    assert state.read_records(tmp_path) == {}


def test_entries_that_are_not_a_parts_record_are_skipped(tmp_path: Path) -> None:
    raw = {
        "s3": {"pid": 12, "port": 9000},
        "mlflow": {"pid": 13},  # no port
        "prefect": "not a record",
        "minio": {"pid": 14, "port": 9001},  # not a part
    }
    (tmp_path / state.STATE_FILE).write_text(json.dumps(raw))
    assert state.read_records(tmp_path) == {"s3": {"pid": 12, "port": 9000}}


def test_a_broken_state_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / state.STATE_FILE).write_text("{not json")
    with pytest.raises(StackError, match=r"stack\.json is not valid JSON .*stop its servers"):
        state.read_records(tmp_path)


def test_a_stack_state_finds_a_parts_url(tmp_path: Path) -> None:
    rows = tuple(
        state.ServiceStatus(name, f"http://127.0.0.1:{n}", n, True, True, "healthy")
        for n, name in enumerate(("s3", "mlflow"), start=1)
    )
    stack_state = state.StackState(tmp_path, rows, started=("mlflow",))
    assert stack_state.url("mlflow") == "http://127.0.0.1:2"
    assert stack_state.healthy
