"""Tests for lora_ops.data.validation: file-level problems, token counts, template refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from lora_ops import data
from tests.unit.data.samples import (
    ASSISTANT,
    SYSTEM,
    USER,
    as_line,
    valid_lines,
    write_lines,
)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_file_is_a_file_level_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)

    report = data.validate_file(path)

    assert [(p.line, p.reason) for p in report.problems] == [(None, "the file holds no examples")]
    assert str(report.problems[0]) == f"{path}: the file holds no examples"


def test_too_few_examples_is_a_file_level_problem(tmp_path: Path) -> None:
    path = write_lines(tmp_path, valid_lines(3))

    report = data.validate_file(path, min_examples=10)

    assert len(report.problems) == 1
    assert report.problems[0].line is None
    assert "only 3 valid examples; at least 10" in report.problems[0].reason
    assert data.validate_file(path, min_examples=3).ok


def test_too_long_example_is_reported_with_its_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(12)
    lines[6] = as_line({"prompt": "word " * 200, "completion": "fine"})
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tiny_tokenizer, max_seq_len=64)

    assert report.too_long == 1
    assert [p.line for p in report.problems] == [7]
    assert "over max_seq_len 64" in report.problems[0].reason
    assert report.summary()["too_long"] == 1


# ---------------------------------------------------------------------------- valid files


def test_messages_file_passes_with_token_counts(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    lines = valid_lines(11)
    # Ending on a user turn after an assistant turn is accepted (context without loss).
    lines.append(as_line({"messages": [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "k"}]}))
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tiny_tokenizer, max_seq_len=512)

    assert report.ok, [str(p) for p in report.problems]
    assert report.examples == 12
    assert len(report.token_counts) == 12
    summary = report.summary()
    assert summary["examples"] == 12
    assert summary["problems"] == 0
    assert summary["too_long"] == 0
    assert summary["tokens_min"] <= summary["tokens_median"] <= summary["tokens_max"] <= 512


def test_template_refusal_is_reported_on_its_line(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if messages | length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}"
        + tiny_tokenizer.chat_template
    )
    lines = valid_lines(12)
    lines[4] = as_line({"messages": [USER, ASSISTANT, USER, ASSISTANT]})
    path = write_lines(tmp_path, lines)

    report = data.validate_file(path, tokenizer)

    assert [(p.line, p.field) for p in report.problems] == [(5, "chat_template")]
    assert "roles must alternate" in report.problems[0].reason
