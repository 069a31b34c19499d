"""Webhooks: ``fine_tuning.job.succeeded|failed|cancelled`` POSTed to one URL, signed as
OpenAI signs them (Standard Webhooks: ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so the ``openai``
client's ``webhooks.unwrap`` verifies them with the same ``whsec_`` secret.

Delivery is at least once: a job is marked notified only after a 2xx answer, and the
app's refresher tries again on its next round until then.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass

import httpx

from lora_ops.api.views import unix
from lora_ops.db.finetuning import FineTuningRecords
from lora_ops.db.models import FineTuningJob
from lora_ops.errors import InputError

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
ENDED = ("succeeded", "failed", "cancelled")


def new_secret() -> str:
    """A fresh ``whsec_`` secret, as OpenAI's dashboard hands them out."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Webhook:
    """Where job endings go, and the secret they are signed with."""

    url: str
    secret: str
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"{self.url!r} is not an http(s) URL", field="webhook_url")
        if not self.secret.startswith(SECRET_PREFIX):
            raise InputError("the webhook secret must be a whsec_ secret", field="webhook_secret")

    def headers(self, body: bytes, webhook_id: str, timestamp: int) -> dict[str, str]:
        key = base64.b64decode(self.secret.removeprefix(SECRET_PREFIX))
        signed = f"{webhook_id}.{timestamp}.".encode() + body
        signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{signature}",
            "content-type": "application/json",
        }

    def send(self, job: FineTuningJob) -> bool:
        """POST the job's ending; True when the receiver took it (2xx)."""
        event_id = "evt_" + hashlib.sha256(f"{job.id}:{job.status}".encode()).hexdigest()[:24]
        body = json.dumps(
            {
                "id": event_id,
                "object": "event",
                "created_at": unix(job.finished_at),
                "type": f"fine_tuning.job.{job.status}",
                "data": {"id": job.id},
            }
        ).encode()
        headers = self.headers(body, event_id, int(time.time()))
        try:
            answer = httpx.post(self.url, content=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            log.warning("webhook for %s not delivered: %s", job.id, exc)
            return False
        if not answer.is_success:
            log.warning("webhook for %s refused: HTTP %d", job.id, answer.status_code)
        return answer.is_success


def deliver_pending(webhook: Webhook, records: FineTuningRecords) -> int:
    """Send every ended job's event not yet delivered; how many were delivered."""
    delivered = 0
    for job in records.jobs_with_status(set(ENDED)):
        if not job.notified and webhook.send(job):
            records.update_job(job.id, {"notified": True})
            delivered += 1
    return delivered
