"""Who may use which model on a replica: the admin token, and customer-bound API keys.

Keys come from a JSON file ``{"<key>": {"customer": "acme", "allow_base": false}}``. Only
their sha256 is kept in memory. With no keys configured, inference is open (a replica
behind a private gateway); admin routes always need the admin token.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from lora_ops import names
from lora_ops.errors import InputError


@dataclass(frozen=True)
class KeyGrant:
    customer: str
    allow_base: bool = False

    def allows(self, model: str) -> bool:
        return model == self.customer or (model == "base" and self.allow_base)


class AccessDenied(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        self.status, self.message, self.kind = status, message, kind
        super().__init__(message)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(path: Path) -> dict[str, KeyGrant]:
    """Read a keys file; returns sha256(key) -> grant. Bad entries are refused by name."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the API keys file: {exc}", file=path) from None
    if not isinstance(raw, dict):
        raise InputError("must hold an object of key -> grant", file=path)
    grants = {}
    for index, (key, grant) in enumerate(raw.items(), 1):
        where = f"entry {index}"
        if not isinstance(key, str) or len(key) < 16:
            raise InputError(
                "keys must be strings of at least 16 characters", file=path, field=where
            )
        if not isinstance(grant, dict) or set(grant) - {"customer", "allow_base"}:
            raise InputError("grant must be {customer, allow_base}", file=path, field=where)
        grants[_digest(key)] = KeyGrant(
            names.check_customer(grant.get("customer")), grant.get("allow_base", False) is True
        )
    return grants


class Access:
    """Checks bearer tokens against the admin token and the customer keys."""

    def __init__(self, admin_token: str | None, api_keys: dict[str, KeyGrant] | None) -> None:
        self.admin_token = admin_token
        self.api_keys = api_keys or {}

    def _bearer(self, authorization: str | None) -> str | None:
        if authorization and authorization.startswith("Bearer "):
            return authorization[7:]
        return None

    def is_admin(self, authorization: str | None) -> bool:
        token = self._bearer(authorization)
        return bool(token and self.admin_token and secrets.compare_digest(token, self.admin_token))

    def require_admin(self, authorization: str | None) -> None:
        if self._bearer(authorization) is None:
            raise AccessDenied(401, "an admin bearer token is required", "authentication_error")
        if not self.is_admin(authorization):
            raise AccessDenied(403, "the admin token is not valid", "permission_error")

    def grant(self, authorization: str | None) -> KeyGrant | None:
        """The caller's grant; None means every model (open replica, or the admin)."""
        if not self.api_keys or self.is_admin(authorization):
            return None
        token = self._bearer(authorization)
        grant = self.api_keys.get(_digest(token)) if token else None
        if grant is None:
            raise AccessDenied(401, "a valid API key is required", "authentication_error")
        return grant

    def require_model(self, authorization: str | None, model: str) -> None:
        grant = self.grant(authorization)
        if grant is not None and not grant.allows(model):
            raise AccessDenied(
                403, f"this API key may not use the model {model!r}", "permission_error"
            )
