"""Storage against a real S3 server (rclone serve s3): folders, checksums, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_ops.storage import MANIFEST, Storage, StorageError
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
KEY, SECRET = "test-key", "test-secret-value-1234"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    rclone = str(Path(sys.executable).parent / "rclone")
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{KEY},{SECRET}"'}
    data = tmp_path_factory.mktemp("s3")
    server = subprocess.Popen(
        [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--vfs-cache-mode",
            "off",
            str(data),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    storage = Storage(url, KEY, SECRET, attempts=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            storage.ensure_bucket("bucket")
            break
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def storage(endpoint: str) -> Storage:
    return Storage(endpoint, KEY, SECRET, multipart_threshold=5 * 1024 * 1024)


def make_folder(root: Path) -> Path:
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "nested" / "deeper" / "weights.bin").write_bytes(os.urandom(4096))
    return root


def test_folder_round_trip_with_checksums(storage: Storage, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "src")
    manifest = storage.upload_dir(folder, "s3://bucket/runs/1/", progress=False)
    assert set(manifest.files) == {"a.json", "nested/deeper/weights.bin"}
    keys = storage.list_keys("s3://bucket/runs/1/")
    assert keys[-1] == "runs/1/nested/deeper/weights.bin"
    assert f"runs/1/{MANIFEST}" in keys
    got = storage.download_dir("s3://bucket/runs/1/", tmp_path / "dst")
    assert got.files == manifest.files
    for name in manifest.files:
        assert (tmp_path / "dst" / name).read_bytes() == (folder / name).read_bytes()


def test_large_file_goes_multipart(storage: Storage, tmp_path: Path) -> None:
    big = tmp_path / "big" / "blob.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    parts: list[str] = []
    storage.client.meta.events.register(
        "before-call.s3.UploadPart", lambda **kwargs: parts.append("part")
    )
    storage.upload_dir(big.parent, "s3://bucket/big/", progress=False)
    assert len(parts) == 3  # 12 MiB in 5 MiB parts
    storage.download_dir("s3://bucket/big/", tmp_path / "back")
    assert (tmp_path / "back" / "blob.bin").read_bytes() == big.read_bytes()


def test_prefix_without_manifest_is_incomplete(storage: Storage, tmp_path: Path) -> None:
    storage.write_json("s3://bucket/half/file.json", {"a": 1})
    with pytest.raises(StorageError, match="incomplete upload"):
        storage.download_dir("s3://bucket/half/", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_corrupted_object_fails_verification_and_lands_nothing(
    storage: Storage, tmp_path: Path
) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/c/", progress=False)
    storage.client.put_object(Bucket="bucket", Key="c/a.json", Body=b'{"x": 2}')
    with pytest.raises(StorageError, match=r"c/a\.json does not match its sha256"):
        storage.download_dir("s3://bucket/c/", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_manifest_path_traversal_is_refused(storage: Storage, tmp_path: Path) -> None:
    storage.write_json(
        f"s3://bucket/evil/{MANIFEST}",
        {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}},
    )
    with pytest.raises(StorageError, match="unsafe path"):
        storage.download_dir("s3://bucket/evil/", tmp_path / "dst")
    assert not (tmp_path.parent / "escape.txt").exists()


def test_wrong_secret_names_credentials_not_the_secret(endpoint: str) -> None:
    wrong = "definitely-not-the-secret"
    with pytest.raises(StorageError) as info:
        Storage(endpoint, KEY, wrong, attempts=1).list_keys("s3://bucket/")
    message = str(info.value)
    assert "refused the credentials" in message
    assert endpoint in message
    assert wrong not in message
    assert SECRET not in message


def test_unreachable_endpoint_is_named_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    storage = Storage(url, KEY, SECRET, attempts=2, backoff_s=0.05, connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"S3 at {url} is unreachable \\(bucket bucket\\)"):
        storage.exists("s3://bucket/anything")
    assert time.monotonic() - started < 10


def test_missing_bucket_is_named(storage: Storage) -> None:
    with pytest.raises(StorageError, match="bucket nope does not exist"):
        storage.list_keys("s3://nope/x")


def test_delete_prefix(storage: Storage, tmp_path: Path) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/gone/", progress=False)
    assert storage.delete_prefix("s3://bucket/gone/") == 3
    assert storage.list_keys("s3://bucket/gone/") == []
    assert not storage.exists(f"s3://bucket/gone/{MANIFEST}")
