"""The S3 client: objects and whole folders up and down; every boto3 call of lora-ops.

A folder is uploaded file by file and its ``MANIFEST.json`` (path -> sha256, size) is
written last, so a prefix with a manifest is a complete upload; downloads check every
file against it and land in place only when all of them match. The manifest, not S3 user
metadata, carries the checksums: some S3 servers (rclone's) lose metadata on restart.
Each operation goes through :func:`~lora_ops.storage.retries.call_with_retries`.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from tqdm.auto import tqdm

from lora_ops.errors import InputError
from lora_ops.files import replace_folder, sha256_file, staging_folder
from lora_ops.names import SHA256, parse_s3_uri
from lora_ops.settings import Settings
from lora_ops.storage.config import StorageConfig
from lora_ops.storage.errors import NoSuchObjectError, StorageError
from lora_ops.storage.manifest import MANIFEST, FileEntry, Manifest, files_of
from lora_ops.storage.retries import call_with_retries, error_code, http_status, missing_as_error

log = logging.getLogger(__name__)

T = TypeVar("T")
_SESSION_LOCK = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


def _folder(prefix_uri: str) -> str:
    """``s3://b/a`` or ``s3://b/a/`` -> ``s3://b/a/``, checked (no '..', a valid bucket)."""
    folder = prefix_uri.rstrip("/") + "/"
    parse_s3_uri(folder)
    return folder


class Storage:
    """One S3 endpoint and its client; every boto3 call of lora-ops goes through here.

    Secrets go into the boto3 client only: no attribute, repr or message holds them.
    """

    def __init__(self, config: StorageConfig) -> None:
        """Build the client from ``config``; nothing is contacted yet."""
        self.endpoint_url = config.endpoint_url
        self.region = config.region
        self.attempts = max(1, config.attempts)
        self.backoff_s = config.backoff_s
        boto_config = Config(
            # rclone's S3 server does not return the checksums newer boto3 validates.
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            retries={"mode": "standard", "max_attempts": config.request_retries},
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            s3={"addressing_style": "path"},
        )
        # One shared session keeps botocore's model cache (a new one costs ~0.1 s); making
        # clients from it is not thread-safe, so under a lock. The clients themselves are.
        with _SESSION_LOCK:
            self.client = _session().client(
                "s3",
                endpoint_url=config.endpoint_url,
                aws_access_key_id=config.access_key,
                aws_secret_access_key=config.secret_key,
                region_name=config.region,
                config=boto_config,
            )
        self.transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold,
            multipart_chunksize=config.multipart_chunksize or config.multipart_threshold,
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Any) -> Storage:
        """A Storage for the configured endpoint and keys (default: the environment's).

        ``options`` go to :class:`StorageConfig`: attempts, timeouts, part size.
        """
        return cls(StorageConfig.from_settings(settings, **options))

    def __repr__(self) -> str:
        return f"Storage({self.endpoint_url!r})"

    def _call(self, what: str, bucket: str, action: Callable[[], T]) -> T:
        """Run one S3 operation with this endpoint's retries (see ``call_with_retries``)."""
        return call_with_retries(
            action,
            what,
            bucket,
            endpoint_url=self.endpoint_url,
            attempts=self.attempts,
            backoff_s=self.backoff_s,
        )

    # -- objects --------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` unless it exists; safe to call again and from several processes."""
        # AWS wants a location constraint in every region but us-east-1, which refuses one.
        constraint = {"LocationConstraint": self.region}
        where = {"CreateBucketConfiguration": constraint} if self.region != "us-east-1" else {}

        def create() -> None:
            try:
                self.client.head_bucket(Bucket=bucket)
                return
            except ClientError as exc:
                if http_status(exc) != 404:
                    raise
            try:
                self.client.create_bucket(Bucket=bucket, **where)
                log.info("created bucket %s at %s", bucket, self.endpoint_url)
            except ClientError as exc:  # another process was quicker
                if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
                self.client.head_bucket(Bucket=bucket)

        self._call(f"create the bucket {bucket}", bucket, create)

    def exists(self, uri: str) -> bool:
        """Whether the object at ``uri`` exists; a missing bucket raises StorageError."""
        bucket, key = parse_s3_uri(uri)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if http_status(exc) != 404:
                    raise
                self.client.head_bucket(Bucket=bucket)  # HEAD's 404 could be the bucket's
                return False
            return True

        return self._call(f"look up {key}", bucket, head)

    def list_keys(self, prefix_uri: str) -> list[str]:
        """Every key that starts with the URI's key (the bucket left out), sorted."""
        bucket, prefix = parse_s3_uri(prefix_uri)

        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
            return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

        return self._call(f"list {prefix or '/'}", bucket, listing)

    def upload_file(
        self,
        path: Path,
        uri: str,
        sha256: str | None = None,
        *,
        on_bytes: Callable[[int], object] | None = None,
    ) -> str:
        """Upload one file (multipart when large), its sha256 in the object's metadata.

        The metadata is a convenience for S3 tools; checks use folder manifests, since
        some servers drop user metadata on restart.

        Args:
            path: The local file.
            uri: Where it goes, ``s3://bucket/key``.
            sha256: Its digest if already known, to save reading the file twice.
            on_bytes: Called with each number of bytes sent, for progress bars.

        Returns:
            The file's sha256.
        """
        bucket, key = parse_s3_uri(uri)
        digest = sha256 or sha256_file(path)
        if not SHA256.fullmatch(digest):
            raise InputError(f"{digest!r} is not a sha256 hex digest", field="sha256")
        extra = {"Metadata": {"sha256": digest}}
        self._call(
            f"upload {key}",
            bucket,
            lambda: self.client.upload_file(
                str(path), bucket, key, ExtraArgs=extra, Callback=on_bytes, Config=self.transfer
            ),
        )
        return digest

    def download_file(self, uri: str, path: Path) -> Path:
        """Download one object to ``path`` (its parent folders are made).

        Raises:
            NoSuchObjectError: No object at ``uri``.
            StorageError: S3 is unreachable, refuses us, or the bucket is missing.
        """
        bucket, key = parse_s3_uri(uri)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            with missing_as_error(uri):
                self.client.download_file(bucket, key, str(path), Config=self.transfer)

        self._call(f"download {key}", bucket, fetch)
        return path

    def read_json(self, uri: str) -> Any:
        """The decoded JSON object at ``uri``.

        Raises:
            NoSuchObjectError: No object at ``uri``.
            StorageError: Not JSON, or S3 is unreachable or refuses us.
        """
        bucket, key = parse_s3_uri(uri)

        def get() -> bytes:
            with missing_as_error(uri):
                return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

        body = self._call(f"read {key}", bucket, get)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{uri} is not JSON: {exc}") from None

    def write_json(self, uri: str, obj: Any) -> None:
        """Store ``obj`` as indented JSON at ``uri`` (replacing what was there)."""
        bucket, key = parse_s3_uri(uri)
        body = json.dumps(obj, indent=2).encode()
        self._call(
            f"write {key}",
            bucket,
            lambda: self.client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json"
            ),
        )

    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object in the folder ``prefix_uri`` (``a`` means ``a/``, not ``ab``).

        Returns:
            How many objects were deleted.

        Raises:
            InputError: The prefix is a whole bucket; that is refused.
        """
        folder = _folder(prefix_uri)
        bucket, key = parse_s3_uri(folder)
        if key == "":
            raise InputError("refusing to delete a whole bucket", file=prefix_uri)
        keys = self.list_keys(folder)

        def delete(batch: list[str]) -> dict[str, Any]:
            objects = [{"Key": k} for k in batch]
            answer: dict[str, Any] = self.client.delete_objects(
                Bucket=bucket, Delete={"Objects": objects}
            )
            return answer

        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = functools.partial(delete, keys[start : start + 1000])
            answer = self._call(f"delete objects under {key}", bucket, batch)
            if errors := answer.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"S3 at {self.endpoint_url} did not delete {len(errors)} objects under "
                    f"{folder}, e.g. {first.get('Key')}: {first.get('Code')}"
                )
        log.info("deleted %d objects under %s", len(keys), folder)
        return len(keys)

    def delete_object(self, uri: str) -> None:
        """Delete one object; deleting a missing one is no error (as in S3)."""
        bucket, key = parse_s3_uri(uri)
        self._call(
            f"delete {key}", bucket, lambda: self.client.delete_object(Bucket=bucket, Key=key)
        )

    # -- folders --------------------------------------------------------------------------

    def upload_dir(self, local_dir: Path, prefix_uri: str, progress: bool = True) -> Manifest:
        """Upload every file under ``local_dir``, then ``MANIFEST.json`` last.

        Until the manifest is written the prefix reads as an incomplete upload; an old
        manifest is removed first, so a re-upload is never mistaken for a finished one.

        Args:
            local_dir: The folder; files are taken recursively, by sorted relative path.
            prefix_uri: The S3 folder, ``s3://bucket/some/prefix/``.
            progress: Show a progress bar over the bytes sent.

        Returns:
            The manifest that was written.

        Raises:
            InputError: ``local_dir`` is not a folder, or holds its own ``MANIFEST.json``.
        """
        local_dir = Path(local_dir)
        folder = _folder(prefix_uri)
        files = files_of(local_dir)
        sizes = {rel: path.stat().st_size for rel, path in files.items()}
        self.delete_object(folder + MANIFEST)
        manifest = Manifest()
        done = 0
        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, disable=not progress)
        with bar:
            for rel, path in files.items():
                bar.set_description(rel, refresh=False)
                digest = self.upload_file(path, folder + rel, on_bytes=bar.update)
                manifest.files[rel] = FileEntry(digest, sizes[rel])
                done += sizes[rel]
                bar.update(done - bar.n)  # exact again after a retried (re-counted) file
        self.write_json(folder + MANIFEST, manifest.to_json())
        log.info("uploaded %d files (%d bytes) to %s", len(files), sum(sizes.values()), folder)
        return manifest

    def download_dir(self, prefix_uri: str, local_dir: Path, verify: bool = True) -> Manifest:
        """Download a folder written by :meth:`upload_dir`: whole and verified, or not at all.

        Files land in a hidden folder beside ``local_dir`` and are renamed into place
        only when every one is in (and matches its sha256); a ``local_dir`` already
        there is replaced.

        Args:
            prefix_uri: The S3 folder.
            local_dir: Where the folder should appear.
            verify: Check each file's sha256 against the manifest.

        Returns:
            The folder's manifest.

        Raises:
            StorageError: No manifest (an incomplete upload), an unsafe path in it, or a
                file that does not match its sha256 (the message names the file).
            NoSuchObjectError: A file the manifest lists is missing.
        """
        folder = _folder(prefix_uri)
        manifest = self._read_manifest(folder)
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(local_dir)
        try:
            for rel, entry in manifest.files.items():
                target = self.download_file(folder + rel, staging / rel)
                if verify and (actual := sha256_file(target)) != entry.sha256:
                    raise StorageError(
                        f"{folder}{rel} does not match its sha256 in {MANIFEST}: got "
                        f"{actual[:12]}… ({target.stat().st_size} bytes), "
                        f"want {entry.sha256[:12]}… ({entry.size} bytes)"
                    )
            replace_folder(staging, local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded %d files from %s to %s", len(manifest.files), folder, local_dir)
        return manifest

    def _read_manifest(self, folder: str) -> Manifest:
        try:
            raw = self.read_json(folder + MANIFEST)
        except NoSuchObjectError:
            raise StorageError(
                f"{folder} has no {MANIFEST}: an incomplete upload (or nothing was uploaded there)"
            ) from None
        return Manifest.from_json(raw, where=folder + MANIFEST)
