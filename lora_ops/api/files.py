"""Uploaded files: checked with the data checks, then stored under ``uploads/<customer>/``.

A file is checked in full before anything is stored (every problem by line, as
``lora-ops data validate`` reports them); the object is written before its row, and
removed again if the row cannot be, so a failure leaves neither.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lora_ops import data, names
from lora_ops.db.finetuning import FineTuningRecords
from lora_ops.db.models import UploadedFile
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.storage import Storage

log = logging.getLogger(__name__)

PURPOSE = "fine-tune"
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_MAX_FILE_BYTES = 512 << 20  # OpenAI takes up to 512 MB per fine-tuning file
_CHUNK = 1 << 20
MAX_PROBLEMS_LISTED = 200


class FileTooLarge(LoraOpsError):
    """An upload is over the size limit."""


class FileRefused(InputError):
    """An upload failed the data checks: every problem, each on its own line."""

    def __init__(self, filename: str, problems: list[InputError]) -> None:
        # Named as the caller named the file, not as the server's scratch copy is.
        shown = [
            str(InputError(p.reason, file=filename, line=p.line, field=p.field))
            for p in problems[:MAX_PROBLEMS_LISTED]
        ]
        if len(problems) > MAX_PROBLEMS_LISTED:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS_LISTED} more problems")
        reason = f"{len(problems)} problem(s), nothing was stored:\n" + "\n".join(shown)
        super().__init__(reason, file=filename)
        self.problems = problems


class Uploads:
    """Customers' fine-tuning files: in S3, described in the service database."""

    def __init__(
        self,
        records: FineTuningRecords,
        storage: Storage,
        bucket: str,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.records, self.storage, self.bucket, self.max_bytes = (
            records,
            storage,
            bucket,
            max_bytes,
        )

    def add(self, customer: str, filename: str, purpose: str, stream: BinaryIO) -> UploadedFile:
        """Check and store one upload.

        Raises:
            InputError: a purpose other than fine-tune, a name that is not .jsonl, .parquet
                or .csv, or data that fails the checks (:class:`FileRefused`).
            FileTooLarge: more than ``max_bytes``.
        """
        names.check_customer(customer)
        if purpose != PURPOSE:
            raise InputError(
                f"only purpose {PURPOSE!r} is served here; got {purpose!r}", field="purpose"
            )
        suffix = Path(filename).suffix.lower()
        if suffix not in FORMATS or Path(filename).name != filename or len(filename) > 255:
            raise InputError(
                f"{filename!r} must be a plain file name ending in {', '.join(FORMATS)}",
                field="file",
            )
        file_id = "file-" + secrets.token_hex(12)
        with _spooled(stream, suffix, self.max_bytes) as (path, size, sha256):
            report = data.validate_file(path, None)
            if not report.ok:
                raise FileRefused(filename, report.problems)
            uri = names.s3_uri(self.bucket, f"uploads/{customer}/{file_id}{suffix}")
            self.storage.upload_file(path, uri, sha256)
        row = UploadedFile(
            id=file_id,
            customer=customer,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            examples=report.examples,
            uri=uri,
        )
        try:
            return self.records.add_file(row)
        except Exception:
            self.storage.delete_object(uri)  # no object without its row
            raise

    def content(self, row: UploadedFile, into: Path) -> Path:
        """Download the file's bytes to ``into``."""
        return self.storage.download_file(row.uri, into)

    def delete(self, row: UploadedFile) -> None:
        """Remove the row first: an object left by a failed delete is unreachable, not wrong."""
        self.records.remove_file(row.id)
        self.storage.delete_object(row.uri)


@contextmanager
def _spooled(stream: BinaryIO, suffix: str, max_bytes: int) -> Iterator[tuple[Path, int, str]]:
    """The stream in a local file (its path, size and sha256), refused past ``max_bytes``."""
    digest, size = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(prefix="lora-ops-upload-") as folder:
        path = Path(folder) / f"upload{suffix}"
        with path.open("wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FileTooLarge(f"the file is over the limit of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        yield path, size, digest.hexdigest()


__all__ = ["DEFAULT_MAX_FILE_BYTES", "FileRefused", "FileTooLarge", "PURPOSE", "Uploads"]
