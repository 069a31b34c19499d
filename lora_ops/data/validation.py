"""Checking a data file whole: every problem by line, and token counts once a tokenizer is given.

Structure is checked without a tokenizer, so ``lora-ops data validate`` answers a broken file
before torch and transformers are imported; with one, every example is rendered, counted and
held against ``max_seq_len`` too.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_ops.data.examples import Example, parse_examples
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
    token_counts: list[int] = field(default_factory=list)
    too_long: int = 0
    max_seq_len: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Flat figures for a CLI table or run parameters; token figures are None untokenized."""
        counts = self.token_counts
        return {
            "path": self.path,
            "examples": self.examples,
            "tokens_min": min(counts) if counts else None,
            "tokens_median": statistics.median(counts) if counts else None,
            "tokens_max": max(counts) if counts else None,
            "too_long": self.too_long,
            "max_seq_len": self.max_seq_len,
            "problems": len(self.problems),
            "ok": self.ok,
        }


def validate_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int = 512,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """Check a data file without raising on its contents.

    Args:
        path: The local JSONL file.
        tokenizer: When given, each example is rendered and tokenized, counted and checked
            against ``max_seq_len``; the chat template is checked too.
        max_seq_len: Most tokens an example may have after the chat template.
        min_examples: Fewest valid examples the file must hold.

    Returns:
        The report; ``report.ok`` is True when no problem was found.

    Raises:
        InputError: The file cannot be read at all.
    """
    examples, tokenized, problems = check_file(path, tokenizer, max_seq_len, min_examples)
    counts = [len(item.input_ids) for item in tokenized]
    return ValidationReport(
        path=str(path),
        examples=len(examples),
        problems=problems,
        token_counts=counts,
        too_long=sum(count > max_seq_len for count in counts),
        max_seq_len=max_seq_len if tokenizer is not None else None,
    )


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
        tokenized = _tokenize_all(path, tokenizer, examples, max_seq_len, problems)
    if 0 < len(examples) < min_examples:
        reason = f"only {len(examples)} valid examples; at least {min_examples} are needed"
        problems.append(InputError(reason, file=path))
    problems.sort(key=lambda p: (p.line is None, p.line or 0))  # stable: keeps order on a line
    return examples, tokenized, problems


def _tokenize_all(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_seq_len: int,
    problems: list[InputError],
) -> list[TokenizedExample]:
    """Tokenize every example, adding template and too-long problems to ``problems``."""
    tokenized = []
    for example in examples:
        try:
            item = tokenize_example(tokenizer, example)
        except InputError as e:  # raised without a file: attach this one
            problems.append(InputError(e.reason, file=path, line=e.line, field=e.field))
            continue
        tokenized.append(item)
        if len(item.input_ids) > max_seq_len:
            reason = (
                f"{len(item.input_ids)} tokens after the chat template, "
                f"over max_seq_len {max_seq_len}"
            )
            problems.append(InputError(reason, file=path, line=example.line))
    return tokenized
