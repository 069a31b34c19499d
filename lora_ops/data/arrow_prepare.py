"""Preparing data at scale: a data file tokenized into memory-mapped Arrow, cached by content.

:func:`prepare_cached` reads a JSONL, Parquet or CSV file once, streaming
(:func:`~lora_ops.data.scan.scan_file`: every check and message of ``data validate``), and
writes each valid example to a staging Arrow file as it goes. The file's content hash and
the settings that shape the result form the cache key (:func:`cache_key`); a folder of that
key already in the cache is loaded as it is (a cache hit: nothing is tokenized). Otherwise
Hugging Face ``datasets`` tokenizes the staged rows with ``map`` (over several processes
once there are enough rows to pay for them), splits them and ``save_to_disk``\\ s the result
(:mod:`lora_ops.data.arrow_store` reads it back memory-mapped and checks it). Memory stays
that of a batch of rows, whatever the file's size.

Processes may share a cache: each stages and builds in folders of its own, and an entry
appears whole, by one rename, or not at all. When two prepare the same key at once, the
first entry published stays and the other process uses it (:func:`~lora_ops.files.
publish_folder`), so an entry a process has loaded is never swapped under it; only an
entry that fails its load checks is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_ops.data.arrow_store import (
    ARROW_FORMAT,
    EVAL_SPLIT,
    TRAIN_SPLIT,
    ArrowPrepared,
    load_arrow,
    write_manifest,
)
from lora_ops.data.arrow_tokenize import StagedFile, StagingWriter, TokenProblem, tokenize_staged
from lora_ops.data.examples import DataError, paired_sha256
from lora_ops.data.scan import ScanResult, SplitPlan, scan_file
from lora_ops.data.validation import MIN_EXAMPLES, too_few
from lora_ops.errors import InputError
from lora_ops.files import publish_folder, replace_folder, staging_folder

if TYPE_CHECKING:  # only for hints
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSettings:
    """What shapes a prepared set besides the data and the tokenizer."""

    max_seq_len: int = 512
    eval_fraction: float = 0.1  # ignored when a validation file holds the eval examples
    min_examples: int = MIN_EXAMPLES
    num_proc: int | None = None  # tokenizing processes; None: by the row count and the cores


@dataclass(frozen=True)
class Staged:
    """A file (and validation file) scanned and staged: what its prepared set is keyed by."""

    sha256: str
    key: str
    source: str
    files: list[StagedFile] = field(default_factory=list)  # the data file first
    rows: int = 0


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 of what decides the tokens: the vocabulary and rules, the chat template and the
    special tokens (the same tokenizer loaded from anywhere gives the same fingerprint)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(sha256: str, tokenizer_sha256: str, max_seq_len: int, split: dict[str, Any]) -> str:
    """The prepared set's name: content, tokenizer, length limit, split and format, hashed."""
    parts = {
        "format": ARROW_FORMAT,
        "content_sha256": sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "max_seq_len": max_seq_len,
        "split": split,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def stage(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    settings: PrepareSettings,
    work: Path,
    *,
    validation_path: Path | None = None,
    source: str | None = None,
) -> Staged:
    """Scan the file(s), staging each valid example in ``work``; refuse any problem.

    Raises:
        DataError: Every structural problem, by file and line, and too few examples.
        InputError: eval_fraction is out of range, or a file cannot be read.
    """
    path = Path(path)
    data_file = work / "staged-data.arrow"
    main = _scan_into(path, settings.eval_fraction, data_file, held_out=False)
    if validation_path is None:
        _refuse([(path, main)], settings.min_examples)
        split: dict[str, Any] = {"eval_fraction": settings.eval_fraction}
        sha256, files = main.sha256, [StagedFile(path, data_file, main.split)]
    else:
        validation_path = Path(validation_path)
        held_file = work / "staged-validation.arrow"
        held = _scan_into(validation_path, settings.eval_fraction, held_file, held_out=True)
        _refuse([(path, main), (validation_path, held)], settings.min_examples)
        split = {"validation_file": True}
        sha256 = paired_sha256(main.sha256, held.sha256)
        files = [
            StagedFile(path, data_file, SplitPlan()),  # every example trains
            StagedFile(validation_path, held_file, SplitPlan(everything_trains=False)),
        ]
    key = cache_key(sha256, tokenizer_fingerprint(tokenizer), settings.max_seq_len, split)
    rows = main.examples + (held.examples if validation_path is not None else 0)
    return Staged(sha256, key, source or str(path), files, rows)


def _scan_into(path: Path, eval_fraction: float, staging: Path, held_out: bool) -> ScanResult:
    """Scan ``path``, staging its examples; a validation file's are all held-out candidates."""
    with StagingWriter(staging) as writer:
        if held_out:
            return scan_file(path, eval_fraction, lambda example, _: writer.add(example, True))
        return scan_file(path, eval_fraction, writer.add)


def _refuse(scans: list[tuple[Path, ScanResult]], min_examples: int) -> None:
    """Raise every problem of the files; the error names the one file at fault, if one."""
    found = [
        (path, scan.problems + too_few(path, scan.examples, min_examples)) for path, scan in scans
    ]
    at_fault = [path for path, problems in found if problems]
    if at_fault:
        everything = [problem for _, problems in found for problem in problems]
        raise DataError(everything, at_fault[0] if len(at_fault) == 1 else None)


def build(
    staged: Staged,
    tokenizer: PreTrainedTokenizerBase,
    settings: PrepareSettings,
    folder: Path,
    *,
    replace: bool = True,
) -> None:
    """Tokenize the staged rows, split them and save the set into ``folder``: replaced whole,
    or with ``replace`` off, kept as it is if another process published it meanwhile.

    Raises:
        DataError: Examples the chat template refuses or that are over max_seq_len.
    """
    staging = staging_folder(folder)
    try:
        with _quiet_progress():
            splits = tokenize_staged(
                staged.files,
                tokenizer,
                settings.max_seq_len,
                _processes(staged.rows, settings),
                staged.key,
                staging.parent / f"{staging.name}-work",
            )
            _refuse_tokenized(staged, splits.problems)
            for name, dataset in ((TRAIN_SPLIT, splits.train), (EVAL_SPLIT, splits.eval)):
                dataset.save_to_disk(str(staging / name))
            sizes = {TRAIN_SPLIT: len(splits.train), EVAL_SPLIT: len(splits.eval)}
        write_manifest(
            staging, staged.sha256, staged.key, staged.source, settings.max_seq_len, sizes
        )
        if replace:
            replace_folder(staging, folder)
        elif not publish_folder(staging, folder):
            log.info("%s was prepared by another process meanwhile: using that", folder)
            return
    except BaseException:
        _remove(staging)
        raise
    finally:
        _remove(staging.parent / f"{staging.name}-work")
    log.info(
        "prepared %s into %s: %d train, %d eval examples", staged.source, folder, *sizes.values()
    )


def _refuse_tokenized(staged: Staged, problems: list[TokenProblem]) -> None:
    """Raise the template and length problems, naming each file and line."""
    if not problems:
        return
    ordered = sorted(problems, key=lambda p: (p.file_index, p.line))
    paths = [item.path for item in staged.files]
    errors = [
        InputError(p.reason, file=paths[p.file_index], line=p.line, field=p.field) for p in ordered
    ]
    at_fault = {p.file_index for p in problems}
    raise DataError(errors, paths[at_fault.pop()] if len(at_fault) == 1 else None)


def _processes(rows: int, settings: PrepareSettings) -> int | None:
    """Worker processes for ``map``: each must get enough rows to repay its start-up."""
    if settings.num_proc is not None:
        return settings.num_proc if settings.num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = min(cores or 1, rows // MIN_ROWS_PER_PROCESS)
    return count if count > 1 else None


MIN_ROWS_PER_PROCESS = 5_000  # below this a process's start-up costs more than it saves


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No progress bars from datasets: the pipeline's logs are read as lines."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def prepare_cached(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    cache_root: Path,
    settings: PrepareSettings | None = None,
    *,
    validation_path: Path | None = None,
    source: str | None = None,
) -> ArrowPrepared:
    """Validate, tokenize and split a data file into ``cache_root/<key>``, or reuse it.

    The same content (whatever its format or JSON spelling) with the same tokenizer and
    settings is a cache hit: nothing is tokenized, ``cache_hit`` is True and it is logged.
    A cached set that no longer passes its load checks is prepared again.

    Raises:
        DataError: Listing every problem in the file(s), too-long examples included.
        InputError: A file cannot be read, or eval_fraction is out of range.
    """
    settings = settings or PrepareSettings()
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=cache_root) as work:
        staged = stage(
            path, tokenizer, settings, Path(work), validation_path=validation_path, source=source
        )
        folder = cache_root / staged.key
        refused = False  # decided once: an entry published after this look is used, not replaced
        if folder.exists():
            try:
                hit = load_arrow(folder)
            except InputError as e:
                log.warning("cached set %s is refused (%s): preparing it again", folder, e)
                refused = True
            else:
                log.info(
                    "cache hit: %s already prepared at %s; nothing tokenized", staged.sha256, folder
                )
                return replace(hit, cache_hit=True)
        build(staged, tokenizer, settings, folder, replace=refused)
    return load_arrow(folder)
