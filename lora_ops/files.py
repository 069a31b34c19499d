"""Local files written so that a crash never leaves half of one: the one copy of each helper.

A file is written beside its target and renamed over it; a folder is built in a staging
folder beside its target and swapped in, the old one removed only once the new one is in.
A folder named by its content is published instead: the first writer's copy stays, and a
later writer drops its own (``publish_folder``), so no reader ever sees it swapped.
(The LoRA core keeps its own atomic write: it imports torch and safetensors alone.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The file's sha256 as 64 lowercase hex digits, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename; their sha256."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def staging_folder(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so the final rename is
    atomic), hidden by its leading dot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))


def replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` goes only once the new one is in."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(staging: Path, target: Path) -> bool:
    """Rename ``staging`` to ``target`` unless another writer's ``target`` is already there.

    For folders named by their content, which any writer fills the same: whoever renames
    first wins, and a reader of that folder never has it replaced under it (as
    ``replace_folder`` would). The rename of a folder onto a non-empty one fails, which
    makes the check and the rename one step. False when ``target`` was there: ``staging``
    is removed and ``target`` left as it was.
    """
    try:
        staging.rename(target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True
