"""A prepared set on disk as Arrow: the manifest, the load-time checks, the read-only rows.

A prepared folder holds ``train/`` and ``eval/`` as ``datasets``' ``save_to_disk`` writes them
(Arrow files, ``dataset_info.json``, ``state.json``) and ``prepared.json``, written last:
what the set is (content sha256, cache key, source, max_seq_len, sizes) and the sha256 of
every file. :func:`load_arrow` memory-maps both splits and refuses a set that is malformed,
cut short or changed, naming the file (and for a bad row, its row number) and what is wrong.
:class:`TokenizedRows` hands the training loop rows one at a time, straight from the map.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from lora_ops.data.prepared import read_manifest_object
from lora_ops.data.tokenize import IGNORE_INDEX, TokenizedExample
from lora_ops.errors import InputError
from lora_ops.files import sha256_file, write_atomic

if TYPE_CHECKING:  # only for hints
    import pyarrow as pa
    from datasets import Dataset

ARROW_FORMAT = 1
PREPARED_MANIFEST = "prepared.json"
TRAIN_SPLIT, EVAL_SPLIT = "train", "eval"
_Issue = tuple[str | None, str]


class TokenizedRows(Sequence[TokenizedExample]):
    """A read-only sequence over a memory-mapped split: rows are read when indexed."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, index: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return _examples(self._dataset[start:stop]) if stop > start else []
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        row = self._dataset[index % len(self)]
        return TokenizedExample(input_ids=row["input_ids"], labels=row["labels"], line=row["line"])

    def __iter__(self) -> Iterator[TokenizedExample]:
        for batch in self._dataset.iter(batch_size=1_000):
            yield from _examples(batch)

    @property
    def files(self) -> list[str]:
        """The Arrow files the rows are memory-mapped from (empty if they were in memory)."""
        return [entry["filename"] for entry in self._dataset.cache_files]

    def __repr__(self) -> str:
        return f"TokenizedRows({len(self)} rows)"


def _examples(columns: dict[str, list[Any]]) -> list[TokenizedExample]:
    return [
        TokenizedExample(input_ids=ids, labels=labels, line=line)
        for ids, labels, line in zip(
            columns["input_ids"], columns["labels"], columns["line"], strict=True
        )
    ]


@dataclass(frozen=True)
class ArrowPrepared:
    """A prepared set, memory-mapped: what ``TrainingJob`` takes as train and eval examples."""

    train: TokenizedRows
    eval: TokenizedRows
    sha256: str  # the data's content hash (both files', with a validation file)
    key: str  # the cache key: content, tokenizer, max_seq_len, split, format
    source: str
    max_seq_len: int
    folder: Path
    cache_hit: bool = False  # True when prepare_cached found it ready: nothing was tokenized


def write_manifest(
    folder: Path, sha256: str, key: str, source: str, max_seq_len: int, sizes: dict[str, int]
) -> None:
    """Write ``prepared.json`` last, with every file's sha256: a folder without it, or whose
    files do not match it, is refused by load_arrow."""
    files = {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != PREPARED_MANIFEST
    }
    manifest = {
        "format": ARROW_FORMAT,
        "sha256": sha256,
        "key": key,
        "source": source,
        "max_seq_len": max_seq_len,
        "sizes": sizes,
        "files": files,
    }
    write_atomic(folder / PREPARED_MANIFEST, [json.dumps(manifest, indent=2).encode() + b"\n"])


def load_arrow(folder: Path) -> ArrowPrepared:
    """Memory-map a prepared folder after checking its manifest, checksums, schema and rows.

    Raises:
        InputError: Naming the file (and row) of the first thing found malformed.
    """
    from datasets import Dataset

    folder = Path(folder)
    manifest = _read_manifest(folder / PREPARED_MANIFEST)
    _check_files(folder, manifest["files"])
    splits = {}
    for name in (TRAIN_SPLIT, EVAL_SPLIT):
        where = folder / name
        try:
            dataset = Dataset.load_from_disk(str(where))
        except Exception as e:  # datasets and pyarrow raise many kinds for a broken folder
            raise InputError(f"cannot load the split: {e}", file=where) from e
        _check_split(dataset, where, manifest["sizes"][name], manifest["max_seq_len"])
        splits[name] = TokenizedRows(dataset)
    return ArrowPrepared(
        train=splits[TRAIN_SPLIT],
        eval=splits[EVAL_SPLIT],
        sha256=manifest["sha256"],
        key=manifest["key"],
        source=manifest["source"],
        max_seq_len=manifest["max_seq_len"],
        folder=folder,
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_manifest_object(path)
    if (problem := _manifest_problem(manifest)) is not None:
        raise InputError(problem[1], file=path, field=problem[0])
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> _Issue | None:
    expected = {"format": int, "sha256": str, "key": str, "source": str, "max_seq_len": int}
    expected |= {"sizes": dict, "files": dict}
    for key, kind in expected.items():
        if type(manifest.get(key)) is not kind:
            return key, f"missing, or not {kind.__name__}"
    if manifest["format"] != ARROW_FORMAT:
        return "format", f"format {manifest['format']} is not {ARROW_FORMAT}"
    for split in (TRAIN_SPLIT, EVAL_SPLIT):
        if not (type(manifest["sizes"].get(split)) is int and manifest["sizes"][split] >= 0):
            return f"sizes.{split}", "missing, or not a count"
    if not all(isinstance(v, str) for v in manifest["files"].values()):
        return "files", "each file needs its sha256"
    if manifest["max_seq_len"] < 1:
        return "max_seq_len", "must be positive"
    return None


def _check_files(folder: Path, files: dict[str, str]) -> None:
    """Every listed file is there and unchanged, and no Arrow file is there unlisted."""
    for name, sha256 in files.items():
        path = folder / name
        if not path.is_file():
            raise InputError("missing: prepared.json lists it", file=path)
        if sha256_file(path) != sha256:
            reason = "contents do not match the sha256 in prepared.json (changed or partly written)"
            raise InputError(reason, file=path)
    for path in folder.rglob("*.arrow"):
        if str(path.relative_to(folder)) not in files:
            raise InputError("not listed in prepared.json (left by another save?)", file=path)


def _check_split(dataset: Dataset, where: Path, size: int, max_seq_len: int) -> None:
    """Columns and types, row count, then every row (column-wise, a batch at a time)."""
    import pyarrow as pa

    want = {"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()), "line": pa.int64()}
    schema = dataset.data.schema
    got = {name: schema.field(name).type for name in schema.names}
    if got != want:
        raise InputError(f"columns {got} are not {want}", file=where, field="columns")
    if len(dataset) != size:
        raise InputError(f"holds {len(dataset)} examples; prepared.json says {size}", file=where)
    for offset, batch in _batches([entry["filename"] for entry in dataset.cache_files]):
        if (found := _first_bad_row(batch, max_seq_len)) is not None:
            row, fld, reason = found
            raise InputError(f"row {offset + row + 1}: {reason}", file=where, field=fld)


def _batches(files: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The split's record batches, read from its files rather than through the memory map:
    each batch is let go once checked, where mapped pages would stay in the process's RSS."""
    import pyarrow as pa

    offset = 0
    for name in files:
        with pa.OSFile(name) as source, pa.ipc.open_stream(source) as reader:
            for batch in reader:
                yield offset, batch
                offset += batch.num_rows


def _first_bad_row(batch: pa.RecordBatch, max_seq_len: int) -> tuple[int, str, str] | None:
    """The first row of ``batch`` that breaks a rule: (row, field, reason), or None."""
    import numpy as np
    import pyarrow.compute as pc

    ids, labels, lines = (batch.column(name) for name in ("input_ids", "labels", "line"))
    if batch.num_rows == 0:
        return None
    id_len = pc.list_value_length(ids).fill_null(-1).to_numpy(zero_copy_only=False)
    label_len = pc.list_value_length(labels).fill_null(-1).to_numpy(zero_copy_only=False)
    line = lines.fill_null(0).to_numpy(zero_copy_only=False)
    shape_rules: list[tuple[Any, str, str]] = [
        (line < 1, "line", "must be a positive integer"),
        (id_len < 1, "input_ids", "must be a non-empty list of token ids"),
        (id_len > max_seq_len, "input_ids", f"over the manifest's max_seq_len {max_seq_len}"),
        (label_len != id_len, "labels", "must be as long as input_ids"),
    ]
    if (found := _first(shape_rules)) is not None:
        return found
    flat_ids = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
    flat_labels = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(batch.num_rows), id_len)
    trained = flat_labels != IGNORE_INDEX
    mismatched = trained & (flat_labels != flat_ids)
    value_rules: list[tuple[Any, str, str]] = [
        (_rows_with(owner, flat_ids < 0, batch.num_rows), "input_ids", "token ids must be >= 0"),
        (_rows_with(owner, mismatched, batch.num_rows), "labels",
         f"each label must be {IGNORE_INDEX} or the input id at its position"),
        (~_rows_with(owner, trained, batch.num_rows), "labels", "no token carries a loss"),
    ]  # fmt: skip
    return _first(value_rules)


def _rows_with(owner: Any, flags: Any, rows: int) -> Any:
    import numpy as np

    found = np.zeros(rows, dtype=bool)
    found[owner[flags]] = True
    return found


def _first(rules: list[tuple[Any, str, str]]) -> tuple[int, str, str] | None:
    """The lowest row any rule flags, with the first rule that flags it."""
    import numpy as np

    best: tuple[int, str, str] | None = None
    for flags, fld, reason in rules:
        hits = np.flatnonzero(flags)
        if len(hits) and (best is None or hits[0] < best[0]):
            best = (int(hits[0]), fld, reason)
    return best
