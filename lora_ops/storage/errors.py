"""What a storage failure raises: StorageError, and NoSuchObjectError for a missing object."""

from __future__ import annotations

from lora_ops.errors import InputError, LoraOpsError


class StorageError(LoraOpsError):
    """S3 could not be reached, refused us, or holds something incomplete or corrupt."""


class NoSuchObjectError(StorageError, InputError):
    """A named object is not there; also an InputError, since retrying will not help."""
