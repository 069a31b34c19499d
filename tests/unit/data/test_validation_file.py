"""A separate validation file: held out whole, checked as the data is, hashed with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from lora_ops.data.examples import DataError

SAMPLE = Path(__file__).parents[3] / "examples" / "acme-support.jsonl"


def lines(path: Path, part: slice) -> Path:
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[part]))
    return path


def test_every_example_trains_and_the_file_is_held_out(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    train = lines(tmp_path / "train.jsonl", slice(0, 20))
    held_out = lines(tmp_path / "held-out.jsonl", slice(20, 32))
    split = data.prepare_dataset(train, tiny_tokenizer, max_seq_len=256)
    given = data.prepare_dataset(train, tiny_tokenizer, max_seq_len=256, validation_path=held_out)
    assert (len(given.train), len(given.eval)) == (20, 12)
    assert [e.line for e in given.eval] == list(range(1, 13))
    assert given.sha256 != split.sha256
    other = lines(tmp_path / "other.jsonl", slice(32, 44))
    moved = data.prepare_dataset(train, tiny_tokenizer, max_seq_len=256, validation_path=other)
    assert moved.sha256 != given.sha256  # new held-out data is new data


def test_a_bad_validation_file_is_refused_like_the_data(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    train = lines(tmp_path / "train.jsonl", slice(0, 20))
    held_out = lines(tmp_path / "held-out.jsonl", slice(20, 25))
    with held_out.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "hi", "name": "x"}]}\n')
    with pytest.raises(DataError) as refused:
        data.prepare_dataset(train, tiny_tokenizer, max_seq_len=256, validation_path=held_out)
    text = str(refused.value)
    assert text.startswith(f"{held_out}: ")
    assert f"{held_out}:6: messages[0]" in text
    assert f"{held_out}: only 5 valid examples; at least 10 are needed" in text
