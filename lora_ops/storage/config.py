"""How to reach one S3 endpoint: its URL, the keys to sign with, and how patiently to try."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from lora_ops.settings import Settings, get_settings

PART_SIZE = 8 * 1024 * 1024  # multipart threshold and part size; S3's minimum part is 5 MiB


@dataclass(frozen=True)
class StorageConfig:
    """Everything a :class:`~lora_ops.storage.Storage` is built from.

    The keys are left out of the repr; Storage hands them to its boto3 client and keeps no
    copy of them (nor of this object).

    Attributes:
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

    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    _: KW_ONLY
    attempts: int = 4
    backoff_s: float = 0.5
    request_retries: int = 2
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = PART_SIZE
    multipart_chunksize: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Any) -> StorageConfig:
        """The configured endpoint and keys (default: the environment's).

        ``options`` (attempts, timeouts, part size) replace the defaults.
        """
        settings = settings or get_settings()
        return cls(
            settings.s3_endpoint_url,
            settings.aws_access_key_id.get_secret_value(),
            settings.aws_secret_access_key.get_secret_value(),
            settings.aws_region,
            **options,
        )
