"""Reading a data file record by record: JSONL lines, Parquet rows, CSV rows, as JSON objects.

Every reader yields ``(number, object, issues)`` one record at a time, so nothing holds the
whole file: ``number`` is where an error points (the 1-based line for JSONL; the row for
Parquet, 1 being the first row; for CSV the line the row starts on, the header being line
1), ``object`` is what the line or row means as a JSON value (None when it could not be
read, or for a blank JSONL line), and ``issues`` say why it could not be read. What the
object must hold is :mod:`lora_ops.data.examples`' business, the same for every format.

How a row maps to a line's object:

* Parquet: the columns are the keys of a JSONL line (``messages``, ``tools``,
  ``parallel_tool_calls``, or ``prompt`` and ``completion``). ``messages`` and ``tools``
  are either JSON text or Arrow lists of structs; a null (a struct field a row leaves
  unset, or a null cell) reads as an absent key, so give ``tools`` as JSON text when a
  schema needs a literal null.
* CSV: a header row names the same columns; ``messages`` and ``tools`` cells hold JSON
  text, ``prompt`` and ``completion`` plain text, ``parallel_tool_calls`` ``true`` or
  ``false``. An empty cell reads as an absent key.

A column that is none of those is refused once for the file, not once per row.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lora_ops.data.fields import Issue, shorten

MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any sane example, small enough to hold in memory
COLUMNS = ("messages", "tools", "parallel_tool_calls", "prompt", "completion")
_JSON_COLUMNS = ("messages", "tools")
_PARQUET_BATCH_ROWS = 512  # rows decoded at a time: memory stays that of a batch

Record = tuple[int, Any, list[Issue]]


def data_format(path: Path) -> str:
    """``parquet``, ``csv`` or ``jsonl``, by the file's suffix; any other name reads as JSONL
    (downloads land under names of their own)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return "jsonl"


def records(path: Path) -> Iterator[Record]:
    """Each record of a JSONL, Parquet or CSV file, read as it is reached.

    Raises:
        OSError: The file cannot be opened or read.
    """
    kind = data_format(path)
    if kind == "parquet":
        return _parquet_records(path)
    if kind == "csv":
        return _csv_records(path)
    return _jsonl_records(path)


# ---------------------------------------------------------------------------- JSONL


def _jsonl_records(path: Path) -> Iterator[Record]:
    for number, raw in _read_lines(path):
        obj, issues = _decode_line(raw, number)
        yield number, obj, issues


def _read_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes without the line ending), or None for a line too long."""
    with path.open("rb") as f:
        for number in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 2)  # room for the limit and "\r\n"
            if not raw:
                return
            if len(raw) == MAX_LINE_BYTES + 2 and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield number, None
                continue
            content = raw.rstrip(b"\r\n")
            yield number, content if len(content) <= MAX_LINE_BYTES else None


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while (chunk := f.readline(MAX_LINE_BYTES)) and not chunk.endswith(b"\n"):
        pass


def _decode_line(raw: bytes | None, number: int) -> tuple[Any, list[Issue]]:
    """One line's JSON value; (None, []) for a blank line, (None, issues) when unreadable."""
    if raw is None:
        return None, [(None, f"line is longer than {MAX_LINE_BYTES} bytes; not read")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")]
    if number == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, []
    return _json_value(text, None)


def _json_value(text: str, field: str | None) -> tuple[Any, list[Issue]]:
    try:
        return json.loads(text), []
    except json.JSONDecodeError as e:
        return None, [(field, f"not valid JSON: {e.msg} at column {e.colno}")]
    except RecursionError:
        return None, [(field, "not valid JSON: nested too deeply")]


# ---------------------------------------------------------------------------- columns


def _column_issue(columns: list[str]) -> Issue | None:
    """The file-level problem with a table's columns, if any."""
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        listed = ", ".join(repr(shorten(name)) for name in unknown)
        reason = (
            f"unknown column(s) {listed}; a row holds 'messages' (with optional 'tools' and "
            "'parallel_tool_calls'), or 'prompt' and 'completion'"
        )
        return shorten(unknown[0]), reason
    if not {"messages", "prompt", "completion"} & set(columns):
        return None, "no 'messages' column, nor 'prompt' and 'completion'"
    return None


def _row_object(cells: dict[str, Any]) -> tuple[Any, list[Issue]]:
    """A row's cells as a line's object: nulls dropped, JSON text of messages/tools decoded."""
    obj: dict[str, Any] = {}
    issues: list[Issue] = []
    for name, value in cells.items():
        if value is None:
            continue
        if name in _JSON_COLUMNS and isinstance(value, str):
            value, more = _json_value(value, name)
            issues += more
        obj[name] = _without_nulls(value)
    return (obj if not issues else None), issues


def _without_nulls(value: Any) -> Any:
    """Arrow structs carry every field of their type; the ones a row leaves null are absent."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


# ---------------------------------------------------------------------------- Parquet


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # only a Parquet file pays for the import

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a file that is not Parquet
        raise OSError(f"not a Parquet file: {e}") from e
    with table:
        columns = list(table.schema_arrow.names)
        if (issue := _column_issue(columns)) is not None:
            yield 0, None, [issue]
            return
        number = 0
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for cells in batch.to_pylist():
                number += 1
                obj, issues = _row_object(cells)
                yield number, obj, issues


# ---------------------------------------------------------------------------- CSV


def _csv_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            if (issue := _column_issue(header)) is not None:
                yield 1, None, [issue]
                return
            start = reader.line_num + 1
            for row in reader:
                yield start, *_csv_row(header, row)
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            # The reader cannot find the next row reliably after this: the rest is unread.
            yield reader.line_num or 1, None, [(None, f"cannot read the rest of the file: {e}")]


def _csv_row(header: list[str], row: list[str]) -> tuple[Any, list[Issue]]:
    if not any(cell.strip() for cell in row):
        return None, []  # a blank row, like a blank JSONL line
    if sum(len(cell) for cell in row) > MAX_LINE_BYTES:
        return None, [(None, f"row is longer than {MAX_LINE_BYTES} characters; not read")]
    if len(row) != len(header):
        return None, [(None, f"holds {len(row)} cells; the header names {len(header)} columns")]
    cells: dict[str, Any] = {
        name: (cell if cell != "" else None) for name, cell in zip(header, row, strict=True)
    }
    flag = cells.get("parallel_tool_calls")
    if flag is not None:
        parsed = {"true": True, "false": False}.get(flag.strip().lower(), flag)
        cells["parallel_tool_calls"] = parsed
    return _row_object(cells)


csv.field_size_limit(MAX_LINE_BYTES + 1)  # larger cells are refused above, by their row
