"""S3 through boto3: folders up and down with sha256 per file, multipart, retries, clear errors.

A folder is uploaded file by file and its ``MANIFEST.json`` (path -> sha256, size) is
written last, so a prefix with a manifest is a complete upload; downloads check every
file against it and land in place only when all of them match. The manifest, not S3 user
metadata, carries the checksums: some S3 servers (rclone's) lose metadata on restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from tqdm.auto import tqdm

from lora_ops.errors import InputError, LoraOpsError
from lora_ops.names import parse_s3_uri
from lora_ops.settings import Settings, get_settings

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
MISSING = {"NoSuchKey", "404", "NotFound"}
T = TypeVar("T")


class StorageError(LoraOpsError):
    """S3 could not be reached, refused us, or holds something incomplete or corrupt."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What a complete folder upload holds: relative path -> checksum and size."""

    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"files": {p: {"sha256": e.sha256, "size": e.size} for p, e in self.files.items()}}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Manifest:
        try:
            files = {
                str(p): FileEntry(str(e["sha256"]), int(e["size"])) for p, e in raw["files"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StorageError(f"{where} is not a valid manifest") from None
        for path in files:
            parts = PurePosixPath(path).parts
            if not parts or path.startswith("/") or ".." in parts or "\\" in path:
                raise StorageError(f"{where} names an unsafe path {path!r}")
        return cls(files)


class Storage:
    """One S3 endpoint and its client; every boto3 call of lora-ops goes through here."""

    def __init__(
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        multipart_threshold: int = 8 * 1024 * 1024,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.attempts = attempts
        self.backoff_s = backoff_s
        config = Config(
            # rclone's S3 server does not return the checksums newer boto3 validates.
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=connect_timeout_s,
            read_timeout=60,
            s3={"addressing_style": "path"},
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=config,
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> Storage:
        settings = settings or get_settings()
        return cls(
            settings.s3_endpoint_url,
            settings.aws_access_key_id.get_secret_value(),
            settings.aws_secret_access_key.get_secret_value(),
            settings.aws_region,
            **kwargs,
        )

    # -- error handling -------------------------------------------------------------------

    def _call(self, what: str, bucket: str, action: Callable[[], T]) -> T:
        """Run one S3 action; retry transient failures with backoff, then explain."""
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in CREDENTIAL_ERRORS:
                    raise StorageError(
                        f"S3 at {self.endpoint_url} refused the credentials ({code}) for "
                        f"bucket {bucket} while trying to {what}"
                    ) from None
                if code in ("NoSuchBucket",):
                    raise StorageError(
                        f"bucket {bucket} does not exist at {self.endpoint_url}"
                    ) from None
                if status < 500 and code not in ("SlowDown", "Throttling", "RequestTimeout"):
                    raise
                error: Exception = exc
            except (BotoCoreError, ConnectionError) as exc:
                error = exc
            if attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "S3 %s failed (%s); retry %d in %.1fs",
                    what,
                    type(error).__name__,
                    attempt,
                    delay,
                )
                time.sleep(delay)
        unreachable = isinstance(error, EndpointConnectionError | ConnectionError)
        problem = "is unreachable" if unreachable else "keeps failing"
        raise StorageError(
            f"S3 at {self.endpoint_url} {problem} (bucket {bucket}) while trying to {what}: "
            f"{type(error).__name__}"
        ) from error

    # -- objects --------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str) -> None:
        def create() -> None:
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in MISSING | {"NoSuchBucket"}:
                    raise
                self.client.create_bucket(Bucket=bucket)

        self._call("create the bucket", bucket, create)

    def exists(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in MISSING:
                    return False
                raise
            return True

        return self._call(f"look up {key}", bucket, head)

    def list_keys(self, prefix_uri: str) -> list[str]:
        """Every key under a prefix (the bucket left out), sorted."""
        bucket, prefix = parse_s3_uri(prefix_uri)

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

        return self._call(f"list {prefix}", bucket, listing)

    def upload_file(self, path: Path, uri: str) -> str:
        """Upload one file (multipart when large); returns its sha256."""
        bucket, key = parse_s3_uri(uri)
        digest = sha256_file(path)
        self._call(
            f"upload {key}",
            bucket,
            lambda: self.client.upload_file(str(path), bucket, key, Config=self.transfer),
        )
        return digest

    def download_file(self, uri: str, path: Path) -> Path:
        bucket, key = parse_s3_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            try:
                self.client.download_file(bucket, key, str(path), Config=self.transfer)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in MISSING:
                    raise InputError("no such object", file=uri) from None
                raise

        self._call(f"download {key}", bucket, fetch)
        return path

    def read_json(self, uri: str) -> Any:
        bucket, key = parse_s3_uri(uri)
        body = self._call(
            f"read {key}",
            bucket,
            lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read(),
        )
        return json.loads(body)

    def write_json(self, uri: str, obj: Any) -> None:
        bucket, key = parse_s3_uri(uri)
        body = json.dumps(obj, indent=2).encode()
        self._call(
            f"write {key}",
            bucket,
            lambda: self.client.put_object(Bucket=bucket, Key=key, Body=body),
        )

    def delete_prefix(self, prefix_uri: str) -> int:
        bucket, _ = parse_s3_uri(prefix_uri)
        keys = self.list_keys(prefix_uri)
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]]}
            self._call(
                "delete objects",
                bucket,
                lambda b=batch: self.client.delete_objects(Bucket=bucket, Delete=b),
            )
        return len(keys)

    # -- folders --------------------------------------------------------------------------

    def upload_dir(self, local_dir: Path, prefix_uri: str, progress: bool = True) -> Manifest:
        """Upload every file under ``local_dir``, then ``MANIFEST.json`` last."""
        prefix = prefix_uri.rstrip("/") + "/"
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        manifest = Manifest()
        total = sum(p.stat().st_size for p in files)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="upload", disable=not progress
        ) as bar:
            for path in files:
                relative = path.relative_to(local_dir).as_posix()
                digest = self.upload_file(path, prefix + relative)
                manifest.files[relative] = FileEntry(digest, path.stat().st_size)
                bar.update(path.stat().st_size)
        self.write_json(prefix + MANIFEST, manifest.to_json())
        return manifest

    def download_dir(self, prefix_uri: str, local_dir: Path, verify: bool = True) -> Manifest:
        """Download a folder uploaded by ``upload_dir``; lands whole and verified, or not at all."""
        prefix = prefix_uri.rstrip("/") + "/"
        if not self.exists(prefix + MANIFEST):
            raise StorageError(f"{prefix} has no {MANIFEST}: an incomplete upload, or nothing")
        manifest = Manifest.from_json(self.read_json(prefix + MANIFEST), prefix + MANIFEST)
        local_dir = Path(local_dir)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}-", dir=local_dir.parent))
        try:
            for relative, entry in manifest.files.items():
                target = self.download_file(prefix + relative, staging / relative)
                if verify and sha256_file(target) != entry.sha256:
                    raise StorageError(
                        f"{prefix}{relative} does not match its sha256 in {MANIFEST}"
                    )
            if local_dir.exists():
                shutil.rmtree(local_dir)
            staging.rename(local_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest
