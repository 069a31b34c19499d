"""A data file checked in one streaming pass: every problem by line, the content hash and the
train/eval plan, with no example held once it has been handed on.

:func:`scan_file` is :func:`~lora_ops.data.examples.parse_examples` for files of any size:
the same checks and messages, but each valid example goes to a callback (or nowhere) instead
of a list. What it must remember grows by 28 bytes an example (a 128-bit fingerprint and
the line, to find exact duplicates once the file is read), so a million examples cost 28 MB
where holding them would cost gigabytes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from lora_ops.data.examples import Example, canonical_json, parse_record
from lora_ops.data.sources import records
from lora_ops.data.split import check_eval_fraction
from lora_ops.errors import InputError

ExampleSink = Callable[[Example, bool], None]  # a valid example, and whether it may go to eval


@dataclass(frozen=True)
class SplitPlan:
    """Which side each example goes to, decided once the whole file has been read.

    An example is held out when its content hash falls under ``eval_fraction`` (its
    "candidate" flag); as in :func:`~lora_ops.data.split.split_examples`, with two or more
    examples each side gets at least one (the lowest-hash example moved to eval, or the
    highest-hash one to train), and a single example trains.
    """

    everything_trains: bool = True
    force_eval_line: int | None = None
    force_train_line: int | None = None

    def holds_out(self, line: int, candidate: bool) -> bool:
        if self.everything_trains or line == self.force_train_line:
            return False
        return candidate or line == self.force_eval_line


@dataclass(frozen=True)
class ScanResult:
    """What one pass over a file found."""

    path: Path
    examples: int  # valid ones, exact duplicates not counted
    problems: list[InputError]
    sha256: str  # content_sha256 of the valid examples, in file order
    split: SplitPlan
    duplicate_lines: frozenset[int]


class _Fingerprints:
    """128 bits of each example's canonical hash and its line, in flat arrays (no objects)."""

    def __init__(self) -> None:
        self._high, self._low, self._lines = array("Q"), array("Q"), array("Q")

    def add(self, digest: bytes, line: int) -> None:
        self._high.append(int.from_bytes(digest[:8], "big"))
        self._low.append(int.from_bytes(digest[8:16], "big"))
        self._lines.append(line)

    def duplicates(self) -> dict[int, int]:
        """Each line repeating an earlier example -> the line of that earlier example."""
        import numpy as np  # only once a file has been read

        if len(self._lines) < 2:
            return {}
        high, low, lines = (np.frombuffer(a, dtype=np.uint64) for a in self._arrays())
        order = np.lexsort((lines, low, high))  # by fingerprint, then by line
        high, low, lines = high[order], low[order], lines[order]
        same = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
        if not same.any():
            return {}
        positions = np.arange(len(lines))
        group_start = np.maximum.accumulate(np.where(np.r_[False, same], 0, positions))
        repeats = np.flatnonzero(np.r_[False, same])
        return {int(lines[i]): int(lines[group_start[i]]) for i in repeats}

    def _arrays(self) -> Iterator[array[int]]:
        yield from (self._high, self._low, self._lines)


@dataclass
class _SplitTally:
    """The counts and extremes the split's corrections need."""

    eval_fraction: float
    examples: int = 0
    candidates: int = 0
    lowest: tuple[bytes, int] | None = None
    highest: tuple[bytes, int] | None = None

    def add(self, digest: bytes, line: int) -> bool:
        self.examples += 1
        candidate = int.from_bytes(digest, "big") / 2**256 < self.eval_fraction
        self.candidates += candidate
        if self.lowest is None or digest < self.lowest[0]:
            self.lowest = (digest, line)
        if self.highest is None or digest > self.highest[0]:
            self.highest = (digest, line)
        return candidate

    def plan(self) -> SplitPlan:
        if self.examples < 2 or self.lowest is None or self.highest is None:
            return SplitPlan()
        force_eval = self.lowest[1] if self.candidates == 0 else None
        force_train = self.highest[1] if self.candidates == self.examples else None
        return SplitPlan(False, force_eval, force_train)


def scan_file(
    path: Path, eval_fraction: float = 0.1, on_example: ExampleSink | None = None
) -> ScanResult:
    """Check every line of ``path`` (see :mod:`lora_ops.data.examples`), streaming.

    Args:
        path: A local JSONL, Parquet or CSV file.
        eval_fraction: The share held out, for the split plan and each example's flag.
        on_example: Called with each valid example in file order (exact duplicates too:
            they are only known at the end, and make the file refused).

    Returns:
        Every problem (exact duplicates included, naming the line they repeat), the
        content hash and the split plan.

    Raises:
        InputError: The file cannot be read at all, or eval_fraction is out of range.
    """
    check_eval_fraction(eval_fraction)
    path = Path(path)
    problems: list[InputError] = []
    fingerprints, tally, content = _Fingerprints(), _SplitTally(eval_fraction), hashlib.sha256()
    try:
        for number, obj, read_issues in records(path):
            example, issues = parse_record(obj, read_issues, number)
            where = number or None  # 0: the file as a whole (a Parquet file's columns)
            problems += [InputError(r, file=path, line=where, field=f) for f, r in issues]
            if example is None:
                continue
            key = canonical_json(example.messages, example.tools).encode()
            content.update(key + b"\n")  # as content_sha256 does
            digest = hashlib.sha256(key).digest()
            fingerprints.add(digest, number)
            candidate = tally.add(digest, number)
            if on_example is not None:
                on_example(example, candidate)
    except OSError as e:
        raise InputError(f"cannot read the file: {e.strerror or e}", file=path) from e
    repeats = fingerprints.duplicates()
    problems += [
        InputError(f"exact duplicate of line {first}", file=path, line=line)
        for line, first in repeats.items()
    ]
    examples = tally.examples - len(repeats)
    if not examples and not problems:
        problems.append(InputError("the file holds no examples", file=path))
    problems.sort(key=lambda p: (p.line is None, p.line or 0))  # stable: keeps order on a line
    return ScanResult(
        path, examples, problems, content.hexdigest(), tally.plan(), frozenset(repeats)
    )


def iter_examples(path: Path, skip_lines: Collection[int] = ()) -> Iterator[Example]:
    """The valid examples of a file already scanned, one at a time (lines in ``skip_lines``,
    its exact duplicates, left out)."""
    try:
        for number, obj, read_issues in records(Path(path)):
            example, _ = parse_record(obj, read_issues, number)
            if example is not None and number not in skip_lines:
                yield example
    except OSError as e:
        raise InputError(f"cannot read the file: {e.strerror or e}", file=path) from e


def examples_at(path: Path, lines: Collection[int]) -> list[Example]:
    """The examples on ``lines`` of a valid file, in file order; stops once all are found."""
    wanted, found = set(lines), []
    for example in iter_examples(path):
        if example.line in wanted:
            found.append(example)
            if len(found) == len(wanted):
                break
    return found
