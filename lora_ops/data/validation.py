"""Checking a data file whole: every problem by line, and token counts once a tokenizer is given.

Structure is checked without a tokenizer, so ``lora-ops data validate`` answers a broken file
before torch and transformers are imported; with one, every example is rendered, counted and
held against ``max_seq_len`` too.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_ops.data.examples import Example, parse_examples
from lora_ops.data.scan import iter_examples, scan_file
from lora_ops.data.tokenize import TokenizedExample, tokenize_example
from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints: importing this module stays cheap (CLI start-up)
    from transformers import PreTrainedTokenizerBase

MIN_EXAMPLES = 10  # fewest valid examples a file must hold, unless a caller says otherwise


@dataclass
class ValidationReport:
    """What validate_file found in one file."""

    path: str
    examples: int
    problems: list[InputError]
    token_counts: Sequence[int] = field(default_factory=list)  # an array for a big file
    too_long: int = 0
    max_seq_len: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Flat figures for a CLI table or run parameters; token figures are None untokenized."""
        low, middle, high = _spread(self.token_counts)
        return {
            "path": self.path,
            "examples": self.examples,
            "tokens_min": low,
            "tokens_median": middle,
            "tokens_max": high,
            "too_long": self.too_long,
            "max_seq_len": self.max_seq_len,
            "problems": len(self.problems),
            "ok": self.ok,
        }


def _spread(counts: Sequence[int]) -> tuple[int | None, float | None, int | None]:
    """Least, median and most, as statistics.median gives them (an int for an odd count),
    sorted in numpy: a million counts stay 4 MB, not a list of Python ints."""
    if not counts:
        return None, None, None
    import numpy as np

    ordered = np.sort(np.asarray(counts, dtype=np.int64))
    half = len(ordered) // 2
    if len(ordered) % 2:
        median: float = int(ordered[half])
    else:
        median = (int(ordered[half - 1]) + int(ordered[half])) / 2
    return int(ordered[0]), median, int(ordered[-1])


def validate_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int = 512,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """Check a data file without raising on its contents, streaming: no example is kept.

    The structure is checked in one pass (:func:`~lora_ops.data.scan.scan_file`); with a
    tokenizer a second pass renders, tokenizes and counts each example, keeping only the
    counts (4 bytes an example).

    Args:
        path: The local JSONL, Parquet or CSV file.
        tokenizer: When given, each example is rendered and tokenized, counted and checked
            against ``max_seq_len``; the chat template is checked too.
        max_seq_len: Most tokens an example may have after the chat template.
        min_examples: Fewest valid examples the file must hold.

    Returns:
        The report; ``report.ok`` is True when no problem was found.

    Raises:
        InputError: The file cannot be read at all.
    """
    path = Path(path)
    scan = scan_file(path)
    problems = list(scan.problems)
    counts: array[int] = array("I")
    if tokenizer is not None:
        examples = iter_examples(path, skip_lines=scan.duplicate_lines)
        for item in _tokenized(path, tokenizer, examples, max_seq_len, problems):
            counts.append(len(item.input_ids))
    problems += too_few(path, scan.examples, min_examples)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))  # stable: keeps order on a line
    return ValidationReport(
        path=str(path),
        examples=scan.examples,
        problems=problems,
        token_counts=counts,
        too_long=sum(1 for count in counts if count > max_seq_len),
        max_seq_len=max_seq_len if tokenizer is not None else None,
    )


def too_few(path: Path, examples: int, min_examples: int) -> list[InputError]:
    if 0 < examples < min_examples:
        reason = f"only {examples} valid examples; at least {min_examples} are needed"
        return [InputError(reason, file=path)]
    return []


def check_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    max_seq_len: int,
    min_examples: int,
) -> tuple[list[Example], list[TokenizedExample], list[InputError]]:
    """Parse, tokenize and count: examples, their tokenizations, every problem by line."""
    path = Path(path)
    examples, problems = parse_examples(path)
    tokenized: list[TokenizedExample] = []
    if tokenizer is not None:
        tokenized = list(_tokenized(path, tokenizer, examples, max_seq_len, problems))
    problems += too_few(path, len(examples), min_examples)
    problems.sort(key=lambda p: (p.line is None, p.line or 0))  # stable: keeps order on a line
    return examples, tokenized, problems


def _tokenized(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterable[Example],
    max_seq_len: int,
    problems: list[InputError],
) -> Iterator[TokenizedExample]:
    """Tokenize each example as it comes, adding template and too-long problems to
    ``problems``; an example the template refuses is not yielded."""
    for example in examples:
        try:
            item = tokenize_example(tokenizer, example)
        except InputError as e:  # raised without a file: attach this one
            problems.append(InputError(e.reason, file=path, line=e.line, field=e.field))
            continue
        if len(item.input_ids) > max_seq_len:
            problems.append(
                InputError(too_long_reason(item, max_seq_len), file=path, line=example.line)
            )
        yield item


def too_long_reason(item: TokenizedExample, max_seq_len: int) -> str:
    return f"{len(item.input_ids)} tokens after the chat template, over max_seq_len {max_seq_len}"
