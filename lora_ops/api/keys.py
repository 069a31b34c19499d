"""Who is calling: a customer's key (stored as its sha256 only) or the admin token.

A customer key sees only its customer's files, jobs and models; the admin token sees
everyone's. The same ``Authorization: Bearer <key>`` header OpenAI's clients send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from lora_ops import names
from lora_ops.db.finetuning import FineTuningRecords

KEY_PREFIX = "lok-"


class Unauthenticated(Exception):
    """No key, or one that is not known (HTTP 401)."""


@dataclass(frozen=True)
class Caller:
    """The customer a key belongs to; None for the admin."""

    customer: str | None

    @property
    def is_admin(self) -> bool:
        return self.customer is None

    def may_see(self, customer: str) -> bool:
        return self.customer is None or self.customer == customer


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(records: FineTuningRecords, customer: str, label: str = "") -> str:
    """A new key for ``customer``; only its sha256 is stored, so show it once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    records.add_key(digest(key), names.check_customer(customer), label)
    return key


def caller_of(
    authorization: str | None, admin_token: str | None, records: FineTuningRecords
) -> Caller:
    """The caller an ``Authorization`` header names.

    Raises:
        Unauthenticated: no bearer key, or one that is neither the admin token nor a key.
    """
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("an API key is needed: send `Authorization: Bearer <key>`")
    key = key.strip()
    if admin_token and hmac.compare_digest(key.encode(), admin_token.encode()):
        return Caller(None)
    customer = records.key_customer(digest(key))
    if customer is None:
        raise Unauthenticated("the API key is not valid (unknown or revoked)")
    return Caller(customer)
