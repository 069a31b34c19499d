"""S3 through boto3: folders up and down with sha256 per file, multipart, retries, clear errors.

* :mod:`~lora_ops.storage.client`: :class:`Storage`, the one S3 client (every boto3 call).
* :mod:`~lora_ops.storage.config`: :class:`StorageConfig`, the endpoint, keys and patience.
* :mod:`~lora_ops.storage.manifest`: ``MANIFEST.json``, what a complete folder upload holds.
* :mod:`~lora_ops.storage.retries`: which failures are retried, and how each is explained.
* :mod:`~lora_ops.storage.errors`: :class:`StorageError` and :class:`NoSuchObjectError`.

Only ``client`` and ``retries`` import boto3 and botocore (import-linter holds that).
"""

from lora_ops.storage.client import Storage
from lora_ops.storage.config import PART_SIZE, StorageConfig
from lora_ops.storage.errors import NoSuchObjectError, StorageError
from lora_ops.storage.manifest import MANIFEST, FileEntry, Manifest

__all__ = [
    "MANIFEST",
    "PART_SIZE",
    "FileEntry",
    "Manifest",
    "NoSuchObjectError",
    "Storage",
    "StorageConfig",
    "StorageError",
]
