"""Prepared datasets: a data file validated, tokenized and split, and its copy on disk.

``prepare_dataset`` turns a customer's JSONL file into tokenized train/eval splits (nothing
truncated); ``save_prepared`` writes ``train.jsonl``, ``eval.jsonl`` (one tokenized example
a line) and ``manifest.json``; ``load_prepared`` reads them back and refuses anything
malformed or cut short, naming the file and line. This is what the pipeline stores under
``datasets/<customer>/<sha256>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_ops.data.examples import DataError, content_sha256, json_type_name, paired_sha256
from lora_ops.data.split import check_eval_fraction, split_examples
from lora_ops.data.tokenize import IGNORE_INDEX, TokenizedExample
from lora_ops.data.validation import MIN_EXAMPLES, check_file
from lora_ops.errors import InputError
from lora_ops.files import write_atomic

if TYPE_CHECKING:  # only for hints: importing this module stays cheap (CLI start-up)
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "manifest.json"
PREPARED_FORMAT = 1
_Issue = tuple[str | None, str]  # (field, reason) before a file and line are attached


@dataclass(frozen=True)
class PreparedDataset:
    """A tokenized, split dataset and where it came from."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    sha256: str  # dataset_sha256 of the source file
    source: str
    max_seq_len: int


def prepare_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 512,
    eval_fraction: float = 0.1,
    min_examples: int = MIN_EXAMPLES,
    *,
    source: str | None = None,
    validation_path: Path | None = None,
) -> PreparedDataset:
    """Validate, tokenize, mask and split a data file; nothing is truncated.

    With ``validation_path`` nothing is split: every example of ``path`` trains, every
    example of the validation file (checked exactly as the training file is) is held out,
    and the dataset's hash covers both files.

    Args:
        path: The local JSONL file.
        tokenizer: The base model's tokenizer, with its chat template.
        max_seq_len: Most tokens an example may have; longer ones are refused, not cut.
        eval_fraction: Share of examples held out for evaluation, in (0, 1).
        min_examples: Fewest valid examples the file must hold.
        source: Where the file came from (an s3:// URI) if not ``path`` itself.
        validation_path: A local JSONL file of held-out examples, instead of a split.

    Raises:
        DataError: Listing every problem in the file(s), too-long examples included.
        InputError: eval_fraction is out of range.
    """
    check_eval_fraction(eval_fraction)
    examples, tokenized, problems = check_file(path, tokenizer, max_seq_len, min_examples)
    if validation_path is None:
        if problems:
            raise DataError(problems, path)
        by_line = {item.line: item for item in tokenized}
        train, held_out = split_examples(examples, eval_fraction)
        train_items = [by_line[e.line] for e in train]
        eval_items = [by_line[e.line] for e in held_out]
        sha256 = content_sha256(examples)
    else:
        held, eval_items, more = check_file(validation_path, tokenizer, max_seq_len, min_examples)
        _refuse_either(path, problems, validation_path, more)
        train_items = tokenized
        sha256 = paired_sha256(content_sha256(examples), content_sha256(held))
    dataset = PreparedDataset(
        train=train_items,
        eval=eval_items,
        sha256=sha256,
        source=source or str(path),
        max_seq_len=max_seq_len,
    )
    log.info(
        "prepared %s: %d train, %d eval examples, sha256 %s",
        dataset.source,
        len(dataset.train),
        len(dataset.eval),
        dataset.sha256,
    )
    return dataset


def _refuse_either(
    path: Path, problems: list[InputError], validation: Path, more: list[InputError]
) -> None:
    """Raise every problem of both files; the error names the one file at fault, if one."""
    if problems or more:
        at_fault = path if not more else validation if not problems else None
        raise DataError(problems + more, at_fault)


# ---------------------------------------------------------------------------- on disk


def save_prepared(dataset: PreparedDataset, folder: Path) -> None:
    """Write train.jsonl, eval.jsonl and manifest.json into ``folder``.

    Each file is written beside its place and renamed into it; the manifest goes last and
    holds the other files' sha256, so a save cut short is refused by load_prepared rather
    than read as a mix of two datasets.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digests = {
        name: write_atomic(folder / name, (_tokenized_line(item) for item in items))
        for name, items in ((TRAIN_FILE, dataset.train), (EVAL_FILE, dataset.eval))
    }
    manifest = {
        "format": PREPARED_FORMAT,
        "sha256": dataset.sha256,
        "source": dataset.source,
        "max_seq_len": dataset.max_seq_len,
        "sizes": {"train": len(dataset.train), "eval": len(dataset.eval)},
        "files": digests,
    }
    write_atomic(folder / MANIFEST_FILE, [json.dumps(manifest, indent=2).encode() + b"\n"])
    log.debug("saved prepared dataset %s to %s", dataset.sha256, folder)


def _tokenized_line(item: TokenizedExample) -> bytes:
    row = {"line": item.line, "input_ids": item.input_ids, "labels": item.labels}
    return json.dumps(row, separators=(",", ":")).encode() + b"\n"


def load_prepared(folder: Path) -> PreparedDataset:
    """Read a folder written by save_prepared, checking the manifest, shapes and checksums.

    Raises:
        InputError: Naming the file (and line) of the first thing found malformed.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder / MANIFEST_FILE)
    max_seq_len = manifest["max_seq_len"]
    parts = {
        name: _read_tokenized(
            folder / name, manifest["files"][name], manifest["sizes"][split], max_seq_len
        )
        for name, split in ((TRAIN_FILE, "train"), (EVAL_FILE, "eval"))
    }
    return PreparedDataset(
        train=parts[TRAIN_FILE],
        eval=parts[EVAL_FILE],
        sha256=manifest["sha256"],
        source=manifest["source"],
        max_seq_len=max_seq_len,
    )


def read_manifest_object(path: Path) -> dict[str, Any]:
    """A stored set's manifest file as a JSON object; InputError naming the file otherwise."""
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise InputError(f"cannot read the manifest: {e.strerror or e}", file=path) from e
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from e
    except ValueError as e:  # bytes that are not UTF-8
        raise InputError(f"not valid JSON: {e}", file=path) from e
    if not isinstance(manifest, dict):
        raise InputError("expected a JSON object", file=path)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_manifest_object(path)
    if (problem := _manifest_problem(manifest)) is not None:
        raise InputError(problem[1], file=path, field=problem[0])
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> _Issue | None:
    expected = {"format": int, "sha256": str, "source": str, "max_seq_len": int}
    expected |= {"sizes": dict, "files": dict}
    for key, kind in expected.items():
        if type(manifest.get(key)) is not kind:
            return key, f"missing, or not {json_type_name(kind())}"
    if manifest["format"] != PREPARED_FORMAT:
        return "format", f"format {manifest['format']} is not {PREPARED_FORMAT}"
    for split in ("train", "eval"):
        if not (type(manifest["sizes"].get(split)) is int and manifest["sizes"][split] >= 0):
            return f"sizes.{split}", "missing, or not a count"
    for name in (TRAIN_FILE, EVAL_FILE):
        if type(manifest["files"].get(name)) is not str:
            return f"files.{name}", "missing, or not a sha256"
    if manifest["max_seq_len"] < 1:
        return "max_seq_len", "must be positive"
    return None


def _read_tokenized(
    path: Path, sha256: str, count: int, max_seq_len: int
) -> list[TokenizedExample]:
    digest = hashlib.sha256()
    items = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                digest.update(raw)
                items.append(_parse_tokenized(raw, number, path, max_seq_len))
    except OSError as e:
        raise InputError(f"cannot read the file: {e.strerror or e}", file=path) from e
    if len(items) != count:
        reason = f"holds {len(items)} examples; manifest.json says {count}"
        raise InputError(reason, file=path)
    if digest.hexdigest() != sha256:
        reason = "contents do not match the sha256 in manifest.json (changed or partly written)"
        raise InputError(reason, file=path)
    return items


def _parse_tokenized(raw: bytes, number: int, path: Path, max_seq_len: int) -> TokenizedExample:
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"not valid JSON: {e}", file=path, line=number) from e
    if (problem := _tokenized_problem(row, max_seq_len)) is not None:
        raise InputError(problem[1], file=path, line=number, field=problem[0])
    return TokenizedExample(input_ids=row["input_ids"], labels=row["labels"], line=row["line"])


def _tokenized_problem(row: Any, max_seq_len: int) -> _Issue | None:
    if not isinstance(row, dict) or set(row) != {"line", "input_ids", "labels"}:
        return None, "expected an object with exactly 'line', 'input_ids' and 'labels'"
    ids, labels = row["input_ids"], row["labels"]
    if not (type(row["line"]) is int and row["line"] >= 1):
        return "line", "must be a positive integer"
    if not (_is_int_list(ids) and ids and min(ids) >= 0):
        return "input_ids", "must be a non-empty list of token ids"
    if len(ids) > max_seq_len:
        return "input_ids", f"{len(ids)} tokens, over the manifest's max_seq_len {max_seq_len}"
    if not (_is_int_list(labels) and len(labels) == len(ids)):
        return "labels", f"must be a list of {len(ids)} integers, as long as input_ids"
    if any(label not in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True)):
        return "labels", f"each label must be {IGNORE_INDEX} or the input id at its position"
    if all(label == IGNORE_INDEX for label in labels):
        return "labels", "no token carries a loss"
    return None


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)
