"""``lora-ops train`` prepares its data as the pipeline's prep step does, on tiny-llama: a JSONL,
Parquet or CSV file into a memory-mapped Arrow set in a local cache, found again (nothing
tokenized) while the data and settings are unchanged; bad data fails by line before the
model loads and leaves no entry behind."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from lora_ops.cli import app
from lora_ops.data.arrow_store import PREPARED_MANIFEST

SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
FLAGS = ["--rank", "4", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--seed", "3"]
WEIGHTS = "adapter_model.safetensors"
runner = CliRunner()


def train(data: Path, out: Path, cache: Path, *more: str) -> Result:
    args = ["train", "--base", "tiny-llama", "--data", str(data), "--out", str(out)]
    return runner.invoke(app, [*args, "--data-cache", str(cache), *FLAGS, *more])


def sample_lines(count: int, start: int = 0) -> list[str]:
    return SAMPLE.read_text().splitlines()[start : start + count]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "acme.jsonl"
    path.write_text("\n".join(sample_lines(24)) + "\n")
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file of a cache entry by its inode and modification time: what a rewrite changes."""
    return {
        str(item.relative_to(folder)): (item.stat().st_ino, item.stat().st_mtime_ns)
        for item in folder.rglob("*")
    }


def test_a_second_run_on_unchanged_data_is_a_cache_hit_with_the_same_weights(
    jsonl: Path, tiny_base: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = train(jsonl, tmp_path / "one", cache)
    assert first.exit_code == 0, first.output
    (entry,) = cache.iterdir()
    assert f"data prepared     22 train, 2 eval examples into {entry}" in first.output
    assert "cache hit" not in first.output
    assert (entry / PREPARED_MANIFEST).is_file()
    files = snapshot(entry)

    second = train(jsonl, tmp_path / "two", cache)

    assert second.exit_code == 0, second.output
    assert f"data cache hit    {entry} (nothing tokenized)" in second.output
    assert "data prepared" not in second.output
    assert list(cache.iterdir()) == [entry]
    assert snapshot(entry) == files  # read as it was: nothing rewritten
    one, two = load_file(tmp_path / "one" / WEIGHTS), load_file(tmp_path / "two" / WEIGHTS)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_parquet_data_with_a_csv_validation_file_trains(tiny_base: Path, tmp_path: Path) -> None:
    """The formats go by their suffix, as in the prep step; the same content in another format
    is the same set, so the JSONL spelling of both files is then a cache hit."""
    train_lines, held_lines = sample_lines(16), sample_lines(10, start=16)
    parquet, held_csv = tmp_path / "train.parquet", tmp_path / "held-out.csv"
    messages = [json.dumps(json.loads(line)["messages"]) for line in train_lines]
    pq.write_table(pa.table({"messages": messages}), parquet)
    with held_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerows([json.dumps(json.loads(line)["messages"])] for line in held_lines)
    cache = tmp_path / "cache"

    done = train(parquet, tmp_path / "adapter", cache, "--validation-data", str(held_csv))

    assert done.exit_code == 0, done.output
    (entry,) = cache.iterdir()
    assert f"data prepared     16 train, 10 eval examples into {entry}" in done.output
    assert (tmp_path / "adapter" / WEIGHTS).is_file()
    train_jsonl, held_jsonl = tmp_path / "train.jsonl", tmp_path / "held-out.jsonl"
    train_jsonl.write_text("\n".join(train_lines) + "\n")
    held_jsonl.write_text("\n".join(held_lines) + "\n")
    again = train(train_jsonl, tmp_path / "again", cache, "--validation-data", str(held_jsonl))
    assert again.exit_code == 0, again.output
    assert f"data cache hit    {entry}" in again.output


BAD_LINES = {
    "broken-json": ('{"messages": [{"role": "user"', "not valid JSON"),
    # Found only once the examples are tokenized: the set was being built when it failed.
    "too-long": (
        json.dumps({"prompt": "long " * 700, "completion": "ok"}),
        "tokens after the chat template, over max_seq_len 512",
    ),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_data_fails_by_line_and_leaves_no_cache_entry(
    case: str, tiny_base: Path, tmp_path: Path
) -> None:
    line, reason = BAD_LINES[case]
    lines = sample_lines(24)
    lines[5] = line
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cache, out = tmp_path / "cache", tmp_path / "adapter"
    args = ["train", "--base", "tiny-llama", "--data", str(path), "--out", str(out)]

    done = subprocess.run(
        [sys.executable, "-c", "from lora_ops.cli import main; main()", *args,
         "--data-cache", str(cache), *FLAGS],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert f"{path}:6: " in done.stderr
    assert reason in done.stderr
    assert "Traceback" not in done.stderr
    assert "data prepared" not in done.stdout
    assert "base on cpu" not in done.stderr  # the model was never loaded
    assert list(cache.iterdir()) == []  # no entry, no staging folder
    assert not out.exists()
