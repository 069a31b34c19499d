"""Tests for lora_ops.data.prepared: prepare a file, save it, load it back, refuse corruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.data import DataError
from lora_ops.data import prepared as prepared_files
from lora_ops.data.prepared import EVAL_FILE, MANIFEST_FILE, TRAIN_FILE
from lora_ops.errors import InputError
from tests.unit.data.samples import as_line, valid_lines, write_lines


@pytest.fixture
def prepared(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> data.PreparedDataset:
    path = write_lines(tmp_path, valid_lines(30), "customer.jsonl")
    return data.prepare_dataset(path, tiny_tokenizer, max_seq_len=128, eval_fraction=0.2)


def test_prepare_dataset_splits_and_records_its_source(
    tmp_path: Path, prepared: data.PreparedDataset
) -> None:
    path = tmp_path / "customer.jsonl"

    assert len(prepared.train) + len(prepared.eval) == 30
    assert prepared.eval
    assert prepared.train
    assert {t.line for t in prepared.train}.isdisjoint(t.line for t in prepared.eval)
    assert prepared.sha256 == data.dataset_sha256(path)
    assert (prepared.source, prepared.max_seq_len) == (str(path), 128)
    assert all(len(t.input_ids) == len(t.labels) <= 128 for t in prepared.train + prepared.eval)


def test_prepare_dataset_raises_listing_too_long_and_bad_lines(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[2] = as_line({"prompt": "long " * 300, "completion": "ok"})
    lines[9] = b"{"
    path = write_lines(tmp_path, lines)

    with pytest.raises(DataError) as caught:
        data.prepare_dataset(path, tiny_tokenizer, max_seq_len=100)

    assert [p.line for p in caught.value.problems] == [3, 10]
    assert f"{path}:3: " in str(caught.value)
    assert "over max_seq_len 100" in str(caught.value)


def test_prepare_dataset_refuses_a_bad_fraction_before_reading(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(InputError, match="eval_fraction"):
        data.prepare_dataset(tmp_path / "missing.jsonl", tiny_tokenizer, eval_fraction=1.0)


# ---------------------------------------------------------------------------- save and load


def test_save_then_load_round_trips(tmp_path: Path, prepared: data.PreparedDataset) -> None:
    folder = tmp_path / "prepared"

    prepared_files.save_prepared(prepared, folder)
    prepared_files.save_prepared(prepared, folder)  # overwriting in place is fine

    assert prepared_files.load_prepared(folder) == prepared
    assert sorted(p.name for p in folder.iterdir()) == [EVAL_FILE, MANIFEST_FILE, TRAIN_FILE]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["sha256"] == prepared.sha256
    assert manifest["sizes"] == {"train": len(prepared.train), "eval": len(prepared.eval)}


def _rewrite_line(path: Path, number: int, edit: Any) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def _edit_row(change: dict[str, Any]) -> Any:
    return lambda line: json.dumps({**json.loads(line), **change})


def _shift_first_token(line: str) -> str:
    row = json.loads(line)
    row["input_ids"][0] += 1  # still well formed: only the checksum can tell
    return json.dumps(row, separators=(",", ":"))


# (file to corrupt, line to corrupt or None for the whole file, how, expected line, phrase)
CORRUPTIONS = [
    pytest.param(TRAIN_FILE, 2, lambda _: "{oops", 2, "not valid JSON", id="train-bad-json"),
    pytest.param(
        TRAIN_FILE, 1, _edit_row({"labels": [1, 2]}), 1, "as long as input_ids", id="labels-short"
    ),
    pytest.param(
        EVAL_FILE, 1, _edit_row({"input_ids": "x"}), 1, "list of token ids", id="ids-not-list"
    ),
    pytest.param(TRAIN_FILE, 1, _edit_row({"extra": 1}), 1, "exactly 'line'", id="extra-key"),
    pytest.param(TRAIN_FILE, 3, _shift_first_token, None, "do not match the sha256", id="checksum"),
    pytest.param(
        MANIFEST_FILE,
        None,
        lambda text: text.replace('"format": 1', '"format": 9'),
        None,
        "format 9",
        id="manifest-format",
    ),
    pytest.param(
        MANIFEST_FILE, None, lambda text: text[:-5], None, "not valid JSON", id="manifest-cut"
    ),
]


@pytest.mark.parametrize(("name", "number", "edit", "line", "phrase"), CORRUPTIONS)
def test_load_prepared_rejects_a_corrupted_file(
    tmp_path: Path,
    prepared: data.PreparedDataset,
    name: str,
    number: int | None,
    edit: Any,
    line: int | None,
    phrase: str,
) -> None:
    folder = tmp_path / "prepared"
    prepared_files.save_prepared(prepared, folder)
    target = folder / name
    if number is None:
        target.write_text(edit(target.read_text()))
    else:
        _rewrite_line(target, number, edit)

    with pytest.raises(InputError) as caught:
        prepared_files.load_prepared(folder)

    assert caught.value.file == str(target)
    if line is not None:
        assert caught.value.line == line
    assert phrase in caught.value.reason


def test_load_prepared_without_manifest(tmp_path: Path, prepared: data.PreparedDataset) -> None:
    folder = tmp_path / "prepared"
    prepared_files.save_prepared(prepared, folder)
    (folder / MANIFEST_FILE).unlink()

    with pytest.raises(InputError, match="cannot read the manifest"):
        prepared_files.load_prepared(folder)
