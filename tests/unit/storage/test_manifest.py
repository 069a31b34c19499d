"""Tests for lora_ops.storage.manifest: a manifest read from S3 is untrusted input."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_ops.errors import InputError
from lora_ops.storage import MANIFEST, FileEntry, Manifest, StorageError
from lora_ops.storage.manifest import files_of

DIGEST = "0" * 64


@pytest.mark.parametrize(
    "path",
    ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "", "./a", "a//b", "a/", MANIFEST, "a\x00b"],
)
def test_unsafe_manifest_paths(path: str) -> None:
    with pytest.raises(StorageError, match="unsafe path"):
        Manifest.from_json({"files": {path: {"sha256": DIGEST, "size": 1}}})


def test_manifest_round_trips_through_its_json() -> None:
    manifest = Manifest({"a.json": FileEntry(DIGEST, 8), "nested/b.bin": FileEntry("f" * 64, 0)})

    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        pytest.param({"files": []}, "is not a valid manifest", id="files-not-an-object"),
        pytest.param({}, "is not a valid manifest", id="no-files"),
        pytest.param({"files": {"a": {"size": 1}}}, "is not a valid manifest", id="no-sha256"),
        pytest.param({"files": {"a": {"sha256": "abc", "size": 1}}}, "bad sha256", id="short"),
        pytest.param({"files": {"a": {"sha256": DIGEST, "size": -1}}}, "or size", id="negative"),
    ],
)
def test_manifest_refuses_what_is_not_one(raw: object, phrase: str) -> None:
    with pytest.raises(StorageError, match=phrase) as caught:
        Manifest.from_json(raw, where="s3://b/x/MANIFEST.json")

    assert str(caught.value).startswith("s3://b/x/MANIFEST.json ")


def test_files_of_lists_every_file_by_sorted_relative_path(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("z.txt", "b/c/d.bin", "a.json"):
        (tmp_path / name).write_text(name)

    assert list(files_of(tmp_path)) == ["a.json", "b/c/d.bin", "z.txt"]
    assert files_of(tmp_path)["b/c/d.bin"] == tmp_path / "b" / "c" / "d.bin"


def test_files_of_refuses_a_missing_folder_and_its_own_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        files_of(tmp_path / "nope")
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(InputError, match="rename it"):
        files_of(tmp_path)
