"""Which S3 failures are worth another try, the retry loop, and the one-line StorageError.

Retries come in two layers. botocore's ``standard`` mode retries each request a few times
within a second (5xx, throttling, dropped connections); around each operation
:func:`call_with_retries` waits longer, with exponential backoff, for a server that is
restarting, then raises :class:`StorageError` naming the endpoint and the bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from boto3.exceptions import Boto3Error, RetriesExceededError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from lora_ops.storage.errors import NoSuchObjectError, StorageError

log = logging.getLogger(__name__)

CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"})
# Connection-level failures: the server is down, restarting, or dropped us mid-request.
UNREACHABLE = (BotoConnectionError, ConnectionClosedError)
TRANSIENT = (*UNREACHABLE, HTTPClientError, IncompleteReadError, RetriesExceededError)
T = TypeVar("T")


def error_code(exc: ClientError) -> str:
    """S3's error code (``NoSuchKey``, ``404``, ...), or "" when the answer has none."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    """The HTTP status S3 answered with, or 0 when the answer has none."""
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
        status = http_status(error)
        return status >= 500 or status == 429 or error_code(error) in THROTTLING_CODES
    return isinstance(error, TRANSIENT)


@contextmanager
def missing_as_error(uri: str) -> Iterator[None]:
    """Turn S3's "no such key" into a NoSuchObjectError that names ``uri``."""
    try:
        yield
    except ClientError as exc:
        if error_code(exc) in MISSING_KEY_CODES:
            raise NoSuchObjectError("no such object", file=uri) from None
        raise


def call_with_retries(
    action: Callable[[], T],
    what: str,
    bucket: str,
    *,
    endpoint_url: str,
    attempts: int,
    backoff_s: float,
) -> T:
    """Run one S3 operation; retry transient failures with backoff, then explain.

    Args:
        action: The operation, a call of the boto3 client.
        what: What it does, for messages ("upload a/b.bin").
        bucket: The bucket it works on, for messages.
        endpoint_url: The S3 server, for messages.
        attempts: Tries in all (>= 1).
        backoff_s: Wait after the first failed try; doubles after each further one.

    Raises:
        StorageError: A failure that is not transient, or still failing after ``attempts``.
            Errors that are not boto's (a missing local file, NoSuchObjectError) pass through.
    """
    attempt = 1
    while True:
        try:
            return action()
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            error = _unwrap(exc)
            if not _is_transient(error) or attempt >= attempts:
                raise explain(error, what, bucket, endpoint_url, attempt) from error
        delay = backoff_s * 2 ** (attempt - 1)
        attempt += 1
        log.warning(
            "S3 at %s: %s failed (%s); try %d of %d in %.2fs",
            endpoint_url,
            what,
            type(error).__name__,
            attempt,
            attempts,
            delay,
        )
        time.sleep(delay)


def explain(
    error: Exception, what: str, bucket: str, endpoint_url: str, tries: int
) -> StorageError:
    """A StorageError saying what went wrong, where; never with the keys in it."""
    where = f"S3 at {endpoint_url}"
    if isinstance(error, ClientError):
        code = error_code(error)
        if code in CREDENTIAL_CODES:
            return StorageError(
                f"{where} refused the credentials ({code}) for bucket {bucket} while "
                f"trying to {what}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code == "NoSuchBucket" or (error.operation_name == "HeadBucket" and code == "404"):
            return StorageError(f"bucket {bucket} does not exist at {endpoint_url}")
        if not _is_transient(error):
            message = error.response.get("Error", {}).get("Message", "")
            return StorageError(f"{where} refused to {what} (bucket {bucket}): {code} {message}")
    if not _is_transient(error):
        return StorageError(f"{where} failed to {what} (bucket {bucket}): {error!r}")
    problem = "is unreachable" if isinstance(error, UNREACHABLE) else "keeps failing"
    return StorageError(
        f"{where} {problem} (bucket {bucket}): could not {what} in {tries} "
        f"{'try' if tries == 1 else 'tries'}: {type(error).__name__}: {error}"
    )
