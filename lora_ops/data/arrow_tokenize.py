"""Staged examples to tokenized Arrow splits: the ``datasets`` half of preparing data at scale.

The scan stages each valid example as a row of an Arrow stream file (its line, the example as
JSON, whether its hash makes it a held-out candidate); ``datasets`` memory-maps that file and
``map``\\ s :func:`tokenize_example` over it, in worker processes when asked, writing token ids
and labels (int32) to Arrow files of its own. Rows the template refuses or that are too long
carry their problem instead of tokens, so every problem is reported at once, by line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from lora_ops.data.examples import Example
from lora_ops.data.scan import SplitPlan
from lora_ops.data.tokenize import tokenize_example
from lora_ops.data.validation import too_long_reason
from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

_STAGED_SCHEMA = pa.schema(
    [("line", pa.int64()), ("example", pa.large_string()), ("candidate", pa.bool_())]
)
_STAGING_BATCH_ROWS = 1_000  # rows buffered before a record batch is written
_MAP_BATCH_ROWS = 256  # rows a map call tokenizes (and holds) at once
KEPT_COLUMNS = ["input_ids", "labels", "line"]


@dataclass(frozen=True)
class StagedFile:
    """A data file's staged rows and how they split."""

    path: Path  # the data file, named in errors
    staging: Path  # its valid examples as an Arrow stream
    plan: SplitPlan


@dataclass(frozen=True)
class TokenProblem:
    """An example refused once tokenized: which file (its index among the staged files)."""

    file_index: int
    line: int
    field: str | None
    reason: str


@dataclass
class TokenizedSplits:
    """The tokenized train and eval sets (memory-mapped) and the problems found."""

    train: Dataset
    eval: Dataset
    problems: list[TokenProblem]


class StagingWriter:
    """Appends valid examples to an Arrow stream file, a record batch at a time."""

    def __init__(self, path: Path) -> None:
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _STAGED_SCHEMA)
        self._rows: dict[str, list[Any]] = {name: [] for name in _STAGED_SCHEMA.names}

    def add(self, example: Example, candidate: bool) -> None:
        self._rows["line"].append(example.line)
        self._rows["example"].append(example_json(example))
        self._rows["candidate"].append(candidate)
        if len(self._rows["line"]) >= _STAGING_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows["line"]:
            self._writer.write_batch(pa.record_batch(self._rows, schema=_STAGED_SCHEMA))
            self._rows = {name: [] for name in _STAGED_SCHEMA.names}

    def __enter__(self) -> StagingWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self._flush()
            self._writer.close()
        finally:
            self._sink.close()


def example_json(example: Example) -> str:
    """The example as it was read (not its canonical form: tool-call arguments keep their
    text), so tokenizing it in another process gives the tokens this one would."""
    plain = {
        "messages": list(example.messages),
        "tools": list(example.tools),
        "parallel_tool_calls": example.parallel_tool_calls,
    }
    return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))


def example_from_json(text: str, line: int) -> Example:
    plain = json.loads(text)
    return Example(
        tuple(plain["messages"]), line, tuple(plain["tools"]), plain["parallel_tool_calls"]
    )


def tokenize_rows(
    batch: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    plan: SplitPlan,
) -> dict[str, list[Any]]:
    """``map``'s function: a batch of staged rows to ids, labels, side and any problem."""
    out: dict[str, list[Any]] = {
        name: [] for name in ("input_ids", "labels", "line", "held_out", "problem", "field")
    }
    for line, text, candidate in zip(
        batch["line"], batch["example"], batch["candidate"], strict=True
    ):
        ids: list[int] = []
        labels: list[int] = []
        problem, where = "", ""
        try:
            item = tokenize_example(tokenizer, example_from_json(text, line))
        except InputError as e:
            problem, where = e.reason, e.field or ""
        else:
            if len(item.input_ids) > max_seq_len:
                problem = too_long_reason(item, max_seq_len)
            else:
                ids, labels = item.input_ids, item.labels
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["line"].append(line)
        out["held_out"].append(plan.holds_out(line, candidate))
        out["problem"].append(problem)
        out["field"].append(where)
    return out


def _features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "line": Value("int64"),
            "held_out": Value("bool"),
            "problem": Value("string"),
            "field": Value("string"),
        }
    )


def tokenize_staged(
    files: list[StagedFile],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    num_proc: int | None,
    fingerprint: str,
    work: Path,
) -> TokenizedSplits:
    """Tokenize every staged file with ``datasets.map`` into ``work``; split by side."""
    from datasets import Dataset, concatenate_datasets

    work.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, staged in enumerate(files):
        rows = Dataset.from_file(str(staged.staging))  # memory-mapped
        parts.append(
            rows.map(
                tokenize_rows,
                batched=True,
                batch_size=_MAP_BATCH_ROWS,
                remove_columns=rows.column_names,
                fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len, "plan": staged.plan},
                features=_features(),
                num_proc=num_proc if num_proc and len(rows) >= 2 * num_proc else None,
                cache_file_name=str(work / f"tokenized-{index}.arrow"),
                new_fingerprint=f"{fingerprint[:32]}-{index}",  # no hashing of the tokenizer
                desc="tokenizing",
            )
        )
    problems = [problem for index, part in enumerate(parts) for problem in _problems(part, index)]
    tokenized = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return TokenizedSplits(
        train=_side(tokenized, False, work / "train-indices.arrow", fingerprint),
        eval=_side(tokenized, True, work / "eval-indices.arrow", fingerprint),
        problems=problems,
    )


def _problems(tokenized: Dataset, file_index: int) -> list[TokenProblem]:
    """The rows that carry a problem, found column-wise (no row is read unless refused)."""
    table = tokenized.data.table
    refused = table.filter(pc.not_equal(table.column("problem"), ""))
    return [
        TokenProblem(file_index, row["line"], row["field"] or None, row["problem"])
        for row in refused.select(["line", "field", "problem"]).to_pylist()
    ]


def _side(tokenized: Dataset, held_out: bool, indices: Path, fingerprint: str) -> Dataset:
    chosen = tokenized.filter(
        lambda flags: [flag == held_out for flag in flags],
        input_columns="held_out",
        batched=True,
        batch_size=10_000,
        cache_file_name=str(indices),
        new_fingerprint=f"{fingerprint[:32]}-{'eval' if held_out else 'train'}",
    )
    return chosen.select_columns(KEPT_COLUMNS)
