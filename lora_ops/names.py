"""The names users and operators rely on: customer ids, MLflow names, S3 keys.

Every builder checks the customer id first, so no name is ever made from an unchecked one.
"""

from __future__ import annotations

import re

from lora_ops.errors import InputError

CUSTOMER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

CANDIDATE, PRODUCTION, PREVIOUS = "candidate", "production", "previous"
ALIASES = (CANDIDATE, PRODUCTION, PREVIOUS)
STAGED_SUFFIX = ":staged"


def check_customer(customer: object) -> str:
    """Return ``customer`` if it is a valid id, else raise before any I/O happens."""
    if not isinstance(customer, str) or not CUSTOMER_ID.fullmatch(customer):
        raise InputError(
            f"{customer!r} is not a customer id: 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit",
            field="customer",
        )
    return customer


def staged_name(customer: str) -> str:
    """The name a version is loaded under on a replica while a deploy smoke-tests it.

    Callers reach a customer's adapter by the customer id only, so a staged version takes
    no traffic; ``:`` cannot occur in an id, so it names no customer.
    """
    return check_customer(customer) + STAGED_SUFFIX


def check_adapter_name(name: object) -> str:
    """Return ``name`` if a replica may hold an adapter under it: a customer id, or a
    customer's :func:`staged_name`."""
    if isinstance(name, str) and name.endswith(STAGED_SUFFIX):
        check_customer(name.removesuffix(STAGED_SUFFIX))
        return name
    return check_customer(name)


def experiment_name(customer: str) -> str:
    return f"lora-ops/{check_customer(customer)}"


def registered_model_name(customer: str) -> str:
    return f"adapter-{check_customer(customer)}"


def dataset_prefix(customer: str, sha256: str) -> str:
    """S3 key prefix of one prepared dataset (no bucket, trailing slash)."""
    if not SHA256.fullmatch(sha256):
        raise InputError(f"{sha256!r} is not a sha256 hex digest", field="dataset_sha256")
    return f"datasets/{check_customer(customer)}/{sha256}/"


def checkpoint_prefix(customer: str, run_id: str) -> str:
    """S3 key prefix of one training run's checkpoints (no bucket, trailing slash)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise InputError(f"{run_id!r} is not a run id", field="run_id")
    return f"checkpoints/{check_customer(customer)}/{run_id}/"


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty, never escapes with '..'."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri)
    if match is None:
        raise InputError(f"{uri!r} is not an s3://bucket/key URI", field="uri")
    key = match.group(2) or ""
    if any(part in ("..", ".") for part in key.split("/")):
        raise InputError(f"{uri!r}: '.' and '..' are not allowed in a key", field="uri")
    return match.group(1), key
