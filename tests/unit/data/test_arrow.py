"""Preparing data with datasets: JSONL, Parquet and CSV to the same Arrow set, errors by line
or row, the content-keyed cache, the memory-mapped rows and the load-time checks."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.data import arrow_prepare
from lora_ops.data.arrow_prepare import PrepareSettings, prepare_cached
from lora_ops.data.arrow_store import PREPARED_MANIFEST, TokenizedRows, load_arrow
from lora_ops.data.examples import DataError
from lora_ops.data.scan import scan_file
from lora_ops.errors import InputError
from tests.unit.data.samples import as_line, chat, tool_chat, valid_lines, write_lines

SETTINGS = PrepareSettings(max_seq_len=512, eval_fraction=0.2)


def objects(count: int) -> list[dict[str, Any]]:
    """Chats and tool chats: nested structs, nulls and JSON-text arguments all travel."""
    return [tool_chat(i) if i % 5 == 0 else chat(i) for i in range(count)]


def write_parquet(path: Path, rows: list[dict[str, Any]], as_json: bool) -> Path:
    """``messages`` and ``tools`` as JSON text, or as Arrow lists of structs."""
    if as_json:
        columns = {
            "messages": [json.dumps(row["messages"]) for row in rows],
            "tools": [json.dumps(row["tools"]) if "tools" in row else None for row in rows],
        }
        pq.write_table(pa.table(columns), path)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages", "tools"])
        for row in rows:
            tools = json.dumps(row["tools"]) if "tools" in row else ""
            writer.writerow([json.dumps(row["messages"]), tools])
    return path


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return objects(30)


@pytest.fixture
def jsonl(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_lines(tmp_path, [as_line(row) for row in rows], "data.jsonl")


def plain(examples: Sequence[data.TokenizedExample]) -> list[tuple[list[int], list[int], int]]:
    return [(e.input_ids, e.labels, e.line) for e in examples]


@pytest.mark.parametrize("kind", ["parquet-json", "parquet-structs", "csv"])
def test_every_format_prepares_to_the_same_examples(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    jsonl: Path,
    kind: str,
) -> None:
    if kind == "csv":
        other = write_csv(tmp_path / "data.csv", rows)
    else:
        other = write_parquet(tmp_path / "data.parquet", rows, as_json=kind == "parquet-json")

    from_jsonl = prepare_cached(jsonl, tiny_tokenizer, tmp_path / "a", SETTINGS)
    from_other = prepare_cached(other, tiny_tokenizer, tmp_path / "b", SETTINGS)
    in_memory = data.prepare_dataset(jsonl, tiny_tokenizer, max_seq_len=512, eval_fraction=0.2)

    assert from_other.sha256 == from_jsonl.sha256 == in_memory.sha256
    assert from_other.key == from_jsonl.key
    assert not from_other.cache_hit
    assert plain(from_jsonl.train) == plain(in_memory.train)
    assert plain(from_jsonl.eval) == plain(in_memory.eval)
    shift = 1 if kind == "csv" else 0  # a CSV's line 1 is its header: rows start on line 2
    for split in ("train", "eval"):
        expected = [
            (ids, labels, line + shift) for ids, labels, line in plain(getattr(from_jsonl, split))
        ]
        assert plain(getattr(from_other, split)) == expected


def test_a_second_prepare_of_the_same_content_is_a_cache_hit(
    tmp_path: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    jsonl: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = prepare_cached(jsonl, tiny_tokenizer, tmp_path / "cache", SETTINGS)

    def no_tokenizing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit tokenized")

    monkeypatch.setattr(arrow_prepare, "tokenize_staged", no_tokenizing)
    respelled = write_parquet(tmp_path / "same.parquet", rows, as_json=True)  # same content
    with caplog.at_level(logging.INFO, logger="lora_ops.data.arrow_prepare"):
        second = prepare_cached(respelled, tiny_tokenizer, tmp_path / "cache", SETTINGS)

    assert second.cache_hit
    assert second.folder == first.folder
    assert plain(second.train) == plain(first.train)
    assert "cache hit" in caplog.text
    with pytest.raises(AssertionError, match="tokenized"):  # other settings: another key
        prepare_cached(jsonl, tiny_tokenizer, tmp_path / "cache", PrepareSettings(max_seq_len=100))


def test_a_cached_set_that_fails_its_checks_is_prepared_again(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, jsonl: Path
) -> None:
    first = prepare_cached(jsonl, tiny_tokenizer, tmp_path / "cache", SETTINGS)
    expected = plain(first.train)
    arrow_file = next((first.folder / "train").glob("*.arrow"))
    arrow_file.write_bytes(arrow_file.read_bytes()[:-100])

    again = prepare_cached(jsonl, tiny_tokenizer, tmp_path / "cache", SETTINGS)

    assert not again.cache_hit
    assert plain(again.train) == expected


def test_tokenizing_over_processes_gives_the_same_set(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, jsonl: Path
) -> None:
    one = prepare_cached(jsonl, tiny_tokenizer, tmp_path / "a", SETTINGS)
    two = prepare_cached(
        jsonl, tiny_tokenizer, tmp_path / "b", PrepareSettings(512, 0.2, num_proc=2)
    )
    assert plain(two.train) == plain(one.train)
    assert plain(two.eval) == plain(one.eval)


# ---------------------------------------------------------------------------- errors


def test_bad_jsonl_lines_are_refused_by_file_and_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[3] = b"{"
    lines[7] = lines[1]
    path = write_lines(tmp_path, lines)

    with pytest.raises(DataError) as refused:
        prepare_cached(path, tiny_tokenizer, tmp_path / "cache", SETTINGS)

    assert [p.line for p in refused.value.problems] == [4, 8]
    assert f"{path}:4: not valid JSON" in str(refused.value)
    assert f"{path}:8: exact duplicate of line 2" in str(refused.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing staged is left behind


def test_too_long_examples_are_refused_with_their_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[2] = as_line({"prompt": "long " * 700, "completion": "ok"})
    path = write_lines(tmp_path, lines)

    with pytest.raises(DataError) as refused:
        prepare_cached(path, tiny_tokenizer, tmp_path / "cache", SETTINGS)

    assert [p.line for p in refused.value.problems] == [3]
    assert f"{path}:3: " in str(refused.value)
    assert "over max_seq_len 512" in str(refused.value)


def test_a_bad_parquet_row_is_named_by_its_row(tmp_path: Path) -> None:
    rows = objects(12)
    rows[4]["messages"][0]["role"] = "robot"
    path = write_parquet(tmp_path / "data.parquet", rows, as_json=True)

    report = data.validate_file(path)

    assert [(p.file, p.line, p.field) for p in report.problems] == [
        (str(path), 5, "messages[0].role")
    ]
    assert str(report.problems[0]).startswith(f"{path}:5: messages[0].role: ")


def test_a_bad_csv_row_is_named_by_its_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", objects(12))
    text = path.read_text().splitlines()
    text[3] = '"[{""role"": ""user""}]",'  # line 4: a user turn without content
    path.write_text("\n".join(text) + "\n")

    report = data.validate_file(path)

    assert {p.line for p in report.problems} == {4}
    assert str(report.problems[0]).startswith(f"{path}:4: messages")


@pytest.mark.parametrize(
    ("header", "reason"),
    [("messages,name", "unknown column(s) 'name'"), ("tools", "no 'messages' column")],
)
def test_a_csv_with_unknown_columns_is_refused_once(
    tmp_path: Path, header: str, reason: str
) -> None:
    path = tmp_path / "data.csv"
    path.write_text(header + "\n" + "\n".join('"[]",x' for _ in range(20)) + "\n")

    report = data.validate_file(path)

    assert len(report.problems) == 1
    assert reason in report.problems[0].reason


def test_prompt_completion_csv_reads_as_two_turns(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    rows = [f'"What is {i}, ""really""?",It is {i}.' for i in range(12)]
    path.write_text("prompt,completion\n" + "\n".join(rows) + "\n")

    (first, *_), problems = data.parse_examples(path)

    assert problems == []
    assert first.messages[0] == {"role": "user", "content": 'What is 0, "really"?'}


def test_the_streaming_scan_finds_what_parsing_whole_finds(tmp_path: Path) -> None:
    lines = [*valid_lines(6), b"[]", valid_lines(1)[0], b"", b'{"prompt": 3}']
    path = write_lines(tmp_path, lines)

    scanned = scan_file(path)
    examples, problems = data.parse_examples(path)

    assert [str(p) for p in scanned.problems] == [str(p) for p in problems]
    assert scanned.examples == len(examples)
    assert scanned.duplicate_lines == {8}


@pytest.mark.parametrize("count", [1, 2, 3, 12])
@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.99])
def test_the_split_plan_matches_split_examples(tmp_path: Path, count: int, fraction: float) -> None:
    path = write_lines(tmp_path, valid_lines(count))
    examples = data.read_examples(path)
    train, held_out = data.split_examples(examples, fraction)
    flags: dict[int, bool] = {}

    scanned = scan_file(path, fraction, lambda e, candidate: flags.update({e.line: candidate}))

    held = [line for line, candidate in flags.items() if scanned.split.holds_out(line, candidate)]
    assert held == [e.line for e in held_out]


# ---------------------------------------------------------------------------- stored set


@pytest.fixture
def stored(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, jsonl: Path
) -> arrow_prepare.ArrowPrepared:
    return prepare_cached(jsonl, tiny_tokenizer, tmp_path / "cache", SETTINGS)


def test_rows_are_a_read_only_memory_mapped_sequence(
    stored: arrow_prepare.ArrowPrepared,
) -> None:
    rows = stored.train
    listed = list(rows)

    assert isinstance(rows, Sequence)
    assert isinstance(rows, TokenizedRows)
    assert len(rows) == len(listed) > 10
    assert rows[0] == listed[0]
    assert rows[-1] == listed[-1]
    assert rows[2:5] == listed[2:5]
    assert rows[::7] == listed[::7]
    assert all(type(t) is int for t in rows[3].input_ids + rows[3].labels)
    assert rows.files  # read from the map
    assert all(Path(f).is_file() for f in rows.files)
    with pytest.raises(IndexError):
        rows[len(rows)]
    with pytest.raises(TypeError):
        rows[0] = rows[1]  # type: ignore[index]


def _first_arrow(folder: Path) -> Path:
    return next((folder / "train").glob("*.arrow"))


def test_a_changed_or_cut_file_is_refused_by_name(stored: arrow_prepare.ArrowPrepared) -> None:
    target = _first_arrow(stored.folder)
    target.write_bytes(target.read_bytes()[:-64])

    with pytest.raises(InputError) as refused:
        load_arrow(stored.folder)

    assert refused.value.file == str(target)
    assert "do not match the sha256" in refused.value.reason


def test_a_set_without_its_manifest_is_refused(stored: arrow_prepare.ArrowPrepared) -> None:
    (stored.folder / PREPARED_MANIFEST).unlink()
    with pytest.raises(InputError, match="cannot read the manifest"):
        load_arrow(stored.folder)


def test_a_manifest_that_miscounts_is_refused(stored: arrow_prepare.ArrowPrepared) -> None:
    manifest_path = stored.folder / PREPARED_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["sizes"]["eval"] += 1
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(InputError) as refused:
        load_arrow(stored.folder)

    assert refused.value.file == str(stored.folder / "eval")
    assert "prepared.json says" in refused.value.reason


def test_a_malformed_row_is_refused_with_its_row(
    tmp_path: Path, stored: arrow_prepare.ArrowPrepared
) -> None:
    from datasets import Dataset

    from lora_ops.data.arrow_store import write_manifest

    train = Dataset.load_from_disk(str(stored.folder / "train"))
    broken = train.map(
        lambda row, i: {"labels": [7] * len(row["labels"]) if i == 3 else row["labels"]},
        with_indices=True,
        features=train.features,
    )
    folder = tmp_path / "broken"
    broken.save_to_disk(str(folder / "train"))
    Dataset.load_from_disk(str(stored.folder / "eval")).save_to_disk(str(folder / "eval"))
    sizes = {"train": len(broken), "eval": len(stored.eval)}
    write_manifest(folder, stored.sha256, stored.key, stored.source, stored.max_seq_len, sizes)

    with pytest.raises(InputError) as refused:
        load_arrow(folder)

    assert refused.value.file == str(folder / "train")
    assert refused.value.field == "labels"
    assert refused.value.reason.startswith("row 4: each label must be -100 or the input id")


def test_the_validation_file_is_held_out_whole(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase, jsonl: Path
) -> None:
    held_out = write_lines(tmp_path, valid_lines(10, start=100), "held-out.jsonl")

    prepared = prepare_cached(
        jsonl, tiny_tokenizer, tmp_path / "cache", SETTINGS, validation_path=held_out
    )
    in_memory = data.prepare_dataset(
        jsonl, tiny_tokenizer, max_seq_len=512, validation_path=held_out
    )

    assert (len(prepared.train), len(prepared.eval)) == (30, 10)
    assert prepared.sha256 == in_memory.sha256
    assert plain(prepared.eval) == plain(in_memory.eval)


def test_the_loop_s_loss_reads_the_rows_as_it_reads_a_list(
    stored: arrow_prepare.ArrowPrepared, tiny_model: Any
) -> None:
    from lora_ops.training.evaluate import eval_loss

    rows = stored.eval
    assert eval_loss(tiny_model, rows, 0, batch_size=2) == pytest.approx(
        eval_loss(tiny_model, list(rows), 0, batch_size=2)
    )
