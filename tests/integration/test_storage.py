"""Storage against a real S3 server (rclone serve s3): folders, checksums, retries, errors."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_ops.errors import InputError
from lora_ops.storage import (
    MANIFEST,
    NoSuchObjectError,
    Storage,
    StorageConfig,
    StorageError,
)
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

KEY, SECRET = "test-key", "test-secret-value-1234"
BUCKET = "bucket"
PART = 5 * 1024 * 1024  # S3's smallest part: a 12 MiB file goes up in 3 parts


def start_rclone(port: int, data: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """``rclone serve s3`` on 127.0.0.1:port; the keys go by environment, not argv (``ps``)."""
    rclone = str(Path(sys.executable).parent / "rclone")
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{KEY},{SECRET}"'}  # CSV: one key,secret pair
    command = [rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--vfs-cache-mode", "off"]
    with log_file.open("ab") as log:
        return subprocess.Popen([*command, str(data)], env=env, stdout=log, stderr=log)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def fast_storage(url: str, secret: str = SECRET, **kwargs: Any) -> Storage:
    """A Storage that gives up quickly: errors are the point of the tests that use it."""
    options: dict[str, Any] = {"attempts": 1, "request_retries": 0, "connect_timeout_s": 1.0}
    return Storage(StorageConfig(url, KEY, secret, **{**options, **kwargs}))


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """A Storage on a fresh rclone S3 server holding one bucket; the server stops after."""
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_rclone(port, root / "data", root / "rclone.log")
    try:
        probe, deadline = fast_storage(url), time.monotonic() + 10
        while True:
            try:
                probe.ensure_bucket(BUCKET)
                break
            except StorageError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "rclone.log").read_text()) from None
                time.sleep(0.05)
        yield Storage(StorageConfig(url, KEY, SECRET, multipart_threshold=PART))
    finally:
        stop(server)


def make_folder(root: Path) -> Path:
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "nested" / "b.txt").write_text("hello\n")
    (root / "nested" / "deeper" / "weights.bin").write_bytes(bytes(range(256)) * 16 + b"\x00\xff")
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_round_trip_with_checksums(storage: Storage, tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    manifest = storage.upload_dir(src, "s3://bucket/runs/1", progress=False)
    names = ["a.json", "nested/b.txt", "nested/deeper/weights.bin"]
    assert list(manifest.files) == names
    assert all(manifest.files[n].sha256 == sha(src / n) for n in names)
    assert manifest.files["nested/deeper/weights.bin"].size == 4098
    assert storage.read_json(f"s3://bucket/runs/1/{MANIFEST}") == manifest.to_json()

    got = storage.download_dir("s3://bucket/runs/1/", tmp_path / "dst")
    assert got == manifest
    landed = (tmp_path / "dst").rglob("*")
    assert (
        sorted(p.relative_to(tmp_path / "dst").as_posix() for p in landed if p.is_file()) == names
    )
    for name in names:
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging left


def test_manifest_is_written_last(storage: Storage, tmp_path: Path) -> None:
    puts: list[str] = []
    hook = "before-parameter-build.s3.PutObject"
    record = lambda params, **_: puts.append(params["Key"])  # noqa: E731
    storage.client.meta.events.register(hook, record)
    try:
        storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/order/", progress=False)
    finally:
        storage.client.meta.events.unregister(hook, record)
    assert puts[-1] == f"order/{MANIFEST}"
    assert puts[:-1] == ["order/a.json", "order/nested/b.txt", "order/nested/deeper/weights.bin"]


def test_large_file_goes_multipart(storage: Storage, tmp_path: Path) -> None:
    big = tmp_path / "big" / "blob.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    parts: list[int] = []
    hook = "before-call.s3.UploadPart"
    record = lambda **_: parts.append(1)  # noqa: E731
    storage.client.meta.events.register(hook, record)
    try:
        manifest = storage.upload_dir(big.parent, "s3://bucket/big/", progress=False)
    finally:
        storage.client.meta.events.unregister(hook, record)
    assert len(parts) == 3  # 12 MiB in 5 MiB parts
    assert manifest.files["blob.bin"].sha256 == sha(big)
    storage.download_dir("s3://bucket/big/", tmp_path / "back")
    assert sha(tmp_path / "back" / "blob.bin") == sha(big)


def test_upload_file_returns_sha256_and_tags_the_object(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("content")
    digest = storage.upload_file(path, "s3://bucket/files/f.txt")
    assert digest == sha(path)
    head = storage.client.head_object(Bucket=BUCKET, Key="files/f.txt")
    metadata = {k.lower(): v for k, v in head["Metadata"].items()}  # rclone says "Sha256"
    assert metadata["sha256"] == digest
    assert storage.exists("s3://bucket/files/f.txt")
    assert not storage.exists("s3://bucket/files/nope.txt")
    storage.download_file("s3://bucket/files/f.txt", tmp_path / "copy" / "f.txt")
    assert (tmp_path / "copy" / "f.txt").read_text() == "content"


def test_missing_objects_are_named(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(NoSuchObjectError, match=r"s3://bucket/none\.json: no such object"):
        storage.read_json("s3://bucket/none.json")
    with pytest.raises(InputError, match="no such object"):  # a user's bad URI: no retrying
        storage.download_file("s3://bucket/none.jsonl", tmp_path / "x.jsonl")


def test_download_replaces_an_existing_folder(storage: Storage, tmp_path: Path) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/replace/", progress=False)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    storage.download_dir("s3://bucket/replace/", dst)
    assert not (dst / "stale.txt").exists()
    assert (dst / "nested" / "b.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_prefix_without_manifest_is_incomplete(storage: Storage, tmp_path: Path) -> None:
    storage.write_json("s3://bucket/half/file.json", {"a": 1})
    with pytest.raises(StorageError, match="incomplete upload"):
        storage.download_dir("s3://bucket/half/", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_corrupted_object_fails_verification_and_lands_nothing(
    storage: Storage, tmp_path: Path
) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/c/", progress=False)
    storage.client.put_object(Bucket=BUCKET, Key="c/nested/b.txt", Body=b"HELLO\n")
    with pytest.raises(
        StorageError, match=r"s3://bucket/c/nested/b\.txt does not match its sha256"
    ):
        storage.download_dir("s3://bucket/c/", tmp_path / "dst")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
    storage.download_dir("s3://bucket/c/", tmp_path / "dst", verify=False)  # asked not to check
    assert (tmp_path / "dst" / "nested" / "b.txt").read_bytes() == b"HELLO\n"


def test_manifest_path_traversal_is_refused(storage: Storage, tmp_path: Path) -> None:
    storage.write_json("s3://bucket/escape.txt", "outside")
    storage.write_json(
        f"s3://bucket/evil/{MANIFEST}",
        {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}},
    )
    target = tmp_path / "a" / "dst"
    with pytest.raises(StorageError, match="unsafe path '../../escape.txt'"):
        storage.download_dir("s3://bucket/evil/", target)
    assert not (tmp_path / "escape.txt").exists()
    assert not target.exists()


def test_keys_never_escape_their_prefix(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'\.\.' are not allowed"):
        storage.exists("s3://bucket/a/../b")
    with pytest.raises(InputError, match=r"'\.\.' are not allowed"):
        storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/a/../b/", progress=False)


def test_wrong_secret_names_credentials_not_the_secret(storage: Storage) -> None:
    wrong = "definitely-not-the-secret"
    bad = fast_storage(storage.endpoint_url, secret=wrong)
    with pytest.raises(StorageError) as info:
        bad.list_keys("s3://bucket/")
    message = str(info.value)
    assert (
        f"S3 at {storage.endpoint_url} refused the credentials (SignatureDoesNotMatch)" in message
    )
    assert "for bucket bucket" in message
    assert wrong not in message
    assert SECRET not in message
    assert wrong not in repr(bad)
    with pytest.raises(StorageError, match="refused the credentials"):  # multipart wrapper too
        bad.write_json("s3://bucket/x.json", {})


def test_unreachable_endpoint_is_named_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = fast_storage(url, attempts=3, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.exists("s3://lora-ops/anything")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith(f"S3 at {url} is unreachable (bucket lora-ops)")
    assert "in 3 tries" in message


def test_retries_until_the_server_comes_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    storage = fast_storage(f"http://127.0.0.1:{port}", attempts=8, backoff_s=0.05)
    servers: list[subprocess.Popen[bytes]] = []
    (tmp_path / "data").mkdir()
    later = threading.Timer(
        0.3, lambda: servers.append(start_rclone(port, tmp_path / "data", tmp_path / "log"))
    )
    later.start()
    try:
        with caplog.at_level(logging.WARNING, logger="lora_ops.storage"):
            storage.ensure_bucket("late")
        assert storage.list_keys("s3://late/") == []
    finally:
        later.join()
        for server in servers:
            stop(server)
    assert any("failed (EndpointConnectionError)" in r.getMessage() for r in caplog.records)


def test_missing_bucket_is_named(storage: Storage, tmp_path: Path) -> None:
    url = storage.endpoint_url
    with pytest.raises(StorageError, match=f"^bucket nope does not exist at {url}$"):
        storage.list_keys("s3://nope/x")
    with pytest.raises(StorageError, match="bucket nope does not exist"):
        storage.exists("s3://nope/x")
    with pytest.raises(StorageError, match="bucket nope does not exist"):
        storage.upload_dir(make_folder(tmp_path / "src"), "s3://nope/x/", progress=False)


def test_list_keys(storage: Storage) -> None:
    for key in ("lk/b.json", "lk/a/1.json", "lkx/c.json"):
        storage.write_json(f"s3://bucket/{key}", {})
    assert storage.list_keys("s3://bucket/lk/") == ["lk/a/1.json", "lk/b.json"]
    assert storage.list_keys("s3://bucket/lk") == ["lk/a/1.json", "lk/b.json", "lkx/c.json"]
    assert storage.list_keys("s3://bucket/none/") == []


def test_delete_prefix(storage: Storage, tmp_path: Path) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/gone/", progress=False)
    storage.write_json("s3://bucket/gone-not/keep.json", {})
    assert storage.delete_prefix("s3://bucket/gone") == 4  # three files and the manifest
    assert storage.list_keys("s3://bucket/gone/") == []
    assert storage.exists("s3://bucket/gone-not/keep.json")
    with pytest.raises(InputError, match="whole bucket"):
        storage.delete_prefix("s3://bucket/")


def test_reupload_hides_the_old_manifest_until_done(storage: Storage, tmp_path: Path) -> None:
    storage.upload_dir(make_folder(tmp_path / "src"), "s3://bucket/re/", progress=False)
    deletes: list[str] = []
    hook = "before-parameter-build.s3.DeleteObject"
    note = lambda params, **_: deletes.append(params["Key"])  # noqa: E731
    storage.client.meta.events.register(hook, note)
    try:
        storage.upload_dir(tmp_path / "src", "s3://bucket/re/", progress=True)
    finally:
        storage.client.meta.events.unregister(hook, note)
    assert deletes == [f"re/{MANIFEST}"]  # before the first file goes up
    assert storage.exists(f"s3://bucket/re/{MANIFEST}")


def test_ensure_bucket_is_idempotent_in_any_region(storage: Storage) -> None:
    elsewhere = Storage(StorageConfig(storage.endpoint_url, KEY, SECRET, region="eu-west-1"))
    for _ in range(2):
        elsewhere.ensure_bucket("eu-bucket")
    storage.ensure_bucket(BUCKET)
    assert storage.list_keys("s3://eu-bucket/") == []
