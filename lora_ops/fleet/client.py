"""The fleet client: replicas registered by URL, and the HTTP calls that drive them.

Replicas are spoken to only through their HTTP API (vLLM's load/unload shapes, OpenAI's
chat completions), so a fleet of vLLM servers started with ``--enable-lora`` works the
same way. The one home of httpx calls to replicas.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from lora_ops.db import Database
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.fleet.smoke import SMOKE_MAX_TOKENS, SMOKE_MESSAGES
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)
URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?$")


class ReplicaError(LoraOpsError):
    """A replica did not do what it was asked."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"replica {url}: {reason}")


class BaseIdentity(NamedTuple):
    """The base model a replica serves: its name, and its weights' sha256 (which adapters'
    ``base_model_sha256`` tags are matched against)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class ReplicaHealth:
    url: str
    healthy: bool
    models: list[str]
    detail: str


def check_url(url: str) -> str:
    if not URL.fullmatch(url):
        raise InputError(f"{url!r} is not an http(s)://host:port URL", field="url")
    return url.rstrip("/")


class Fleet:
    """The registered replicas and the calls that change what they serve."""

    def __init__(
        self, db: Database | None = None, admin_token: str | None = None, timeout_s: float = 120.0
    ) -> None:
        self.db = db or Database.from_settings()
        token = admin_token
        if token is None and (secret := get_settings().admin_token) is not None:
            token = secret.get_secret_value()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s

    def add(self, url: str, base: BaseIdentity | None = None) -> BaseIdentity | None:
        """Register ``url`` with the base it serves: as given, else as the replica declares
        it; None when neither is known yet (it is then left out of placement)."""
        url = check_url(url)
        identity = base or self.declared_base(url)
        self.db.add_replica(url, *(identity or (None, None)))
        return identity

    def learn_bases(self) -> None:
        """Ask replicas registered before their base was known (added while down) again."""
        for replica in self.db.replicas():
            if replica.base_sha256 is None and (identity := self.declared_base(replica.url)):
                self.db.add_replica(replica.url, *identity)

    def declared_base(self, url: str) -> BaseIdentity | None:
        """The base a replica declares on /health (lora-ops replicas); None when it does not
        (vLLM's /health is empty: give the base to ``add``) or cannot be reached."""
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            health = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(health, dict) or not health.get("base_sha256"):
            return None
        return BaseIdentity(str(health.get("base")), str(health["base_sha256"]))

    def remove(self, url: str) -> bool:
        return self.db.remove_replica(url)

    def urls(self) -> list[str]:
        return self.db.replica_urls()

    def answers(self, url: str, timeout_s: float = 5.0) -> str | None:
        """None when the replica's /health answers 200 (it takes traffic), else why not:
        a replica still loading its adapters answers 503."""
        try:
            status = httpx.get(f"{url}/health", timeout=timeout_s).status_code
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        return None if status == 200 else f"/health answered {status}"

    def health(self, url: str) -> ReplicaHealth:
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            models = self.models(url)
        except (httpx.HTTPError, ReplicaError) as exc:
            return ReplicaHealth(url, False, [], str(exc) or type(exc).__name__)
        return ReplicaHealth(url, True, models, "healthy")

    def models(self, url: str) -> list[str]:
        response = self._call("GET", url, "/v1/models")
        return [m["id"] for m in response.json()["data"]]

    def served_from(self, url: str) -> dict[str, str]:
        """Adapter name -> where the replica loaded it from (its ``root`` in /v1/models)."""
        response = self._call("GET", url, "/v1/models")
        return {m["id"]: str(m.get("root")) for m in response.json()["data"] if m["id"] != "base"}

    def load(self, url: str, name: str, lora_path: str, sha256: str | None = None) -> None:
        body = {"lora_name": name, "lora_path": lora_path}
        if sha256:
            body["sha256"] = sha256
        self._call("POST", url, "/v1/load_lora_adapter", json=body)

    def unload(self, url: str, name: str) -> None:
        self._call("POST", url, "/v1/unload_lora_adapter", json={"lora_name": name})

    def smoke(self, url: str, name: str) -> str:
        """The replica's greedy answer to the smoke prompt through adapter ``name``."""
        return self._complete(url, name, SMOKE_MESSAGES, SMOKE_MAX_TOKENS)

    def chat(
        self, url: str, model: str, prompt: str, system: str | None = None, max_tokens: int = 64
    ) -> str:
        """The replica's greedy answer to one user message, through ``model``."""
        system_turn = [{"role": "system", "content": system}] if system else []
        return self._complete(
            url, model, [*system_turn, {"role": "user", "content": prompt}], max_tokens
        )

    def _complete(
        self, url: str, model: str, messages: list[dict[str, str]], max_tokens: int
    ) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        response = self._call("POST", url, "/v1/chat/completions", json=body)
        return str(response.json()["choices"][0]["message"]["content"])

    def _call(self, method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = httpx.request(
                method, url + path, headers=self._headers, timeout=self.timeout_s, **kwargs
            )
        except httpx.HTTPError as exc:
            raise ReplicaError(url, f"unreachable ({type(exc).__name__})") from None
        if response.status_code >= 400:
            raise ReplicaError(
                url, f"{path} answered {response.status_code}: {response.text[:300]}"
            )
        return response
