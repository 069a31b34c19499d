"""S3 through boto3: folders up and down with sha256 per file, multipart, retries, clear errors.

A folder is uploaded file by file and its ``MANIFEST.json`` (path -> sha256, size) is
written last, so a prefix with a manifest is a complete upload; downloads check every
file against it and land in place only when all of them match. The manifest, not S3 user
metadata, carries the checksums: some S3 servers (rclone's) lose metadata on restart.

Retries come in two layers. botocore's ``standard`` mode retries each request a few
times within a second (5xx, throttling, dropped connections); around each operation
:meth:`Storage._call` waits longer, with exponential backoff, for a server that is
restarting, then raises :class:`StorageError` naming the endpoint and the bucket.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tqdm.auto import tqdm

from lora_ops.errors import InputError, LoraOpsError
from lora_ops.files import replace_folder, sha256_file, staging_folder
from lora_ops.names import SHA256, parse_s3_uri
from lora_ops.settings import Settings, get_settings

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PART_SIZE = 8 * 1024 * 1024  # multipart threshold and part size; S3's minimum part is 5 MiB
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"})
# Connection-level failures: the server is down, restarting, or dropped us mid-request.
UNREACHABLE = (BotoConnectionError, ConnectionClosedError)
TRANSIENT = (*UNREACHABLE, HTTPClientError, IncompleteReadError, RetriesExceededError)
T = TypeVar("T")
_SESSION_LOCK = threading.Lock()


class StorageError(LoraOpsError):
    """S3 could not be reached, refused us, or holds something incomplete or corrupt."""


class NoSuchObjectError(StorageError, InputError):
    """A named object is not there; also an InputError, since retrying will not help."""


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


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _unwrap(exc: Exception) -> Exception:
    """The botocore error inside boto3's transfer wrappers, or ``exc`` itself."""
    # S3UploadFailedError hides the ClientError it was raised in; RetriesExceededError is
    # s3transfer giving up re-reading a download.
    inner = exc.last_exception if isinstance(exc, RetriesExceededError) else exc.__context__
    if isinstance(exc, Boto3Error) and isinstance(inner, ClientError | BotoCoreError):
        error: Exception = inner
        return error
    return exc


def _is_transient(error: Exception) -> bool:
    if isinstance(error, ClientError):
        return _status(error) >= 500 or _status(error) == 429 or _code(error) in THROTTLING_CODES
    return isinstance(error, TRANSIENT)


@contextmanager
def _missing_as_error(uri: str) -> Iterator[None]:
    """Turn S3's "no such key" into a NoSuchObjectError that names ``uri``."""
    try:
        yield
    except ClientError as exc:
        if _code(exc) in MISSING_KEY_CODES:
            raise NoSuchObjectError("no such object", file=uri) from None
        raise


def _folder(prefix_uri: str) -> str:
    """``s3://b/a`` or ``s3://b/a/`` -> ``s3://b/a/``, checked (no '..', a valid bucket)."""
    folder = prefix_uri.rstrip("/") + "/"
    parse_s3_uri(folder)
    return folder


class Storage:
    """One S3 endpoint and its client; every boto3 call of lora-ops goes through here.

    Secrets go into the boto3 client only: no attribute, repr or message holds them.
    """

    def __init__(  # noqa: PLR0913 - to take one client config
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        request_retries: int = 2,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        multipart_threshold: int = PART_SIZE,
        multipart_chunksize: int | None = None,
    ) -> None:
        """Build the client; nothing is contacted yet.

        Args:
            endpoint_url: The S3 server, e.g. ``http://127.0.0.1:9000``.
            access_key: Access key id (``secret_key`` the secret) to sign requests with.
            region: Region to sign requests for.
            attempts: Tries of one operation while S3 is unreachable or failing (>= 1).
            backoff_s: Wait after the first failed try; doubles after each further one.
            request_retries: botocore's own quick retries of each request.
            connect_timeout_s: Seconds to wait for a TCP connection.
            read_timeout_s: Seconds to wait for a response.
            multipart_threshold: Files this large or larger go up in parts.
            multipart_chunksize: Part size; defaults to ``multipart_threshold``.
        """
        self.endpoint_url = endpoint_url
        self.region = region
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        config = Config(
            # rclone's S3 server does not return the checksums newer boto3 validates.
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            retries={"mode": "standard", "max_attempts": request_retries},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path"},
        )
        # One shared session keeps botocore's model cache (a new one costs ~0.1 s); making
        # clients from it is not thread-safe, so under a lock. The clients themselves are.
        with _SESSION_LOCK:
            self.client = _session().client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
                config=config,
            )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize or multipart_threshold,
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> Storage:
        """A Storage for the configured endpoint and keys (default: the environment's).

        ``kwargs`` go to the constructor: attempts, timeouts, part size.
        """
        settings = settings or get_settings()
        return cls(
            settings.s3_endpoint_url,
            settings.aws_access_key_id.get_secret_value(),
            settings.aws_secret_access_key.get_secret_value(),
            settings.aws_region,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"Storage({self.endpoint_url!r})"

    # -- errors and retries ---------------------------------------------------------------

    def _call(self, what: str, bucket: str, action: Callable[[], T]) -> T:
        """Run one S3 operation; retry transient failures with backoff, then explain.

        Errors that are not boto's (a missing local file, NoSuchObjectError) pass through.
        """
        attempt = 1
        while True:
            try:
                return action()
            except (BotoCoreError, ClientError, Boto3Error) as exc:
                error = _unwrap(exc)
                if not _is_transient(error) or attempt >= self.attempts:
                    raise self._explain(what, bucket, error, attempt) from error
            delay = self.backoff_s * 2 ** (attempt - 1)
            attempt += 1
            log.warning(
                "S3 at %s: %s failed (%s); try %d of %d in %.2fs",
                self.endpoint_url,
                what,
                type(error).__name__,
                attempt,
                self.attempts,
                delay,
            )
            time.sleep(delay)

    def _explain(self, what: str, bucket: str, error: Exception, tries: int) -> StorageError:
        """A StorageError saying what went wrong, where; never with the keys in it."""
        where = f"S3 at {self.endpoint_url}"
        if isinstance(error, ClientError):
            code = _code(error)
            if code in CREDENTIAL_CODES:
                return StorageError(
                    f"{where} refused the credentials ({code}) for bucket {bucket} while "
                    f"trying to {what}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                )
            if code == "NoSuchBucket" or (error.operation_name == "HeadBucket" and code == "404"):
                return StorageError(f"bucket {bucket} does not exist at {self.endpoint_url}")
            if not _is_transient(error):
                message = error.response.get("Error", {}).get("Message", "")
                return StorageError(
                    f"{where} refused to {what} (bucket {bucket}): {code} {message}"
                )
        if not _is_transient(error):
            return StorageError(f"{where} failed to {what} (bucket {bucket}): {error!r}")
        problem = "is unreachable" if isinstance(error, UNREACHABLE) else "keeps failing"
        return StorageError(
            f"{where} {problem} (bucket {bucket}): could not {what} in {tries} "
            f"{'try' if tries == 1 else 'tries'}: {type(error).__name__}: {error}"
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
                if _status(exc) != 404:
                    raise
            try:
                self.client.create_bucket(Bucket=bucket, **where)
                log.info("created bucket %s at %s", bucket, self.endpoint_url)
            except ClientError as exc:  # another process was quicker
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
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
                if _status(exc) != 404:
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
            with _missing_as_error(uri):
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
            with _missing_as_error(uri):
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

    def _delete_key(self, uri: str) -> None:
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
        files = _files_of(local_dir)
        sizes = {rel: path.stat().st_size for rel, path in files.items()}
        self._delete_key(folder + MANIFEST)
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


def _files_of(local_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, sorted by path; refuses a folder that is not one."""
    if not local_dir.is_dir():
        raise InputError("no such folder", file=local_dir)
    files = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file()}
    if MANIFEST in files:
        raise InputError(f"{MANIFEST} is the name upload_dir writes; rename it", file=local_dir)
    return dict(sorted(files.items()))
