"""A folder upload's manifest: relative path -> sha256 and size, and the local files it lists.

``MANIFEST.json`` is written last, so a prefix holding one is a complete upload. It is read
back from S3 as untrusted input: a path in it must stay inside the folder it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ops.errors import InputError
from lora_ops.names import SHA256
from lora_ops.storage.errors import StorageError

MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class FileEntry:
    """One file of a folder upload: its checksum and size in bytes."""

    sha256: str
    size: int


@dataclass
class Manifest:
    """What a complete folder upload holds: relative POSIX path -> checksum and size."""

    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``MANIFEST.json`` body: ``{"files": {path: {"sha256", "size"}}}``."""
        return {"files": {p: {"sha256": e.sha256, "size": e.size} for p, e in self.files.items()}}

    @classmethod
    def from_json(cls, raw: Any, where: str = MANIFEST) -> Manifest:
        """Parse and check a manifest read from S3; it is untrusted input.

        Args:
            raw: The decoded JSON.
            where: Where it was read from, for error messages.

        Raises:
            StorageError: Not a manifest, a bad checksum or size, or a path that could
                escape the folder it is downloaded into (absolute, ``..``, backslashes).
        """
        try:
            files = {
                str(p): FileEntry(str(e["sha256"]), int(e["size"])) for p, e in raw["files"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StorageError(f"{where} is not a valid manifest") from None
        for path, entry in files.items():
            if not _is_safe_relative_path(path):
                raise StorageError(f"{where} names an unsafe path {path!r}")
            if not SHA256.fullmatch(entry.sha256) or entry.size < 0:
                raise StorageError(f"{where} has a bad sha256 or size for {path!r}")
        return cls(files)


def _is_safe_relative_path(path: str) -> bool:
    """True for ``a/b.txt``; False for anything that could land outside the target folder."""
    return (
        not path.startswith("/")
        and "\\" not in path
        and "\x00" not in path
        and all(part not in ("", ".", "..") for part in path.split("/"))
        and path != MANIFEST
    )


def files_of(local_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, sorted by path; refuses a folder that is not one."""
    if not local_dir.is_dir():
        raise InputError("no such folder", file=local_dir)
    files = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file()}
    if MANIFEST in files:
        raise InputError(f"{MANIFEST} is the name upload_dir writes; rename it", file=local_dir)
    return dict(sorted(files.items()))
