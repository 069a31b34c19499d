"""Local writes that a crash never leaves half done."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_ops.files import (
    publish_folder,
    replace_folder,
    sha256_file,
    staging_folder,
    write_atomic,
)


def test_sha256_file_reads_in_blocks(tmp_path: Path) -> None:
    data = b"x" * (3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_write_atomic_returns_the_digest_and_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "t.jsonl"
    target.write_bytes(b"old")
    digest = write_atomic(target, [b"new ", b"content"])
    assert target.read_bytes() == b"new content"
    assert digest == hashlib.sha256(b"new content").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_a_write_cut_short_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.jsonl"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"half"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_replace_folder_swaps_in_the_new_and_drops_the_old(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    staging = staging_folder(target)
    assert staging.parent == tmp_path
    assert staging.name.startswith(".model-")
    (staging / "new.bin").write_bytes(b"new")
    replace_folder(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    missing = tmp_path / ".gone"  # a staging folder that vanished: its rename fails
    with pytest.raises(FileNotFoundError):
        replace_folder(missing, target)
    assert (target / "old.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_folder_keeps_the_first_writer_s_folder(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    first = staging_folder(target)
    (first / "set.bin").write_bytes(b"first")
    assert publish_folder(first, target)
    inode = (target / "set.bin").stat().st_ino
    second = staging_folder(target)
    (second / "set.bin").write_bytes(b"second")

    assert not publish_folder(second, target)

    assert (target / "set.bin").read_bytes() == b"first"
    assert (target / "set.bin").stat().st_ino == inode  # the same file, never swapped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # the loser's copy is gone
