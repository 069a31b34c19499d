"""The fine-tuning API's app: OpenAI's files and fine_tuning.jobs over the pipeline.

Its own process (``lora-ops api``), not a route of the gateway: it needs S3, MLflow and
Prefect clients and the base models' tokenizers, while the gateway stays a thin proxy on
the serving path; the two scale and fail apart. A customer's key is the same idea in
both, and the model id a job returns is what the gateway serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from lora_ops.api import errors
from lora_ops.api.jobs import ACTIVE
from lora_ops.api.routes import Services, router
from lora_ops.api.webhooks import Webhook, deliver_pending

log = logging.getLogger(__name__)


def create_app(
    services: Services, refresh_s: float = 5.0, webhook: Webhook | None = None
) -> FastAPI:
    """The API over ``services``; every ``refresh_s`` seconds active jobs are brought up to
    date, so a job's end is recorded (and sent to ``webhook``) when it happens, not when
    someone next asks."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_refresh_forever(services, refresh_s, webhook))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="lora-ops fine-tuning API", version="1", lifespan=lifespan)
    app.state.services = services
    errors.install(app)
    app.include_router(router)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def refresh_active(services: Services) -> None:
    """Bring every active job's status up to date with its run."""
    for row in services.records.jobs_with_status(ACTIVE):
        try:
            services.jobs.refresh(row)
        except Exception as exc:  # one job's trouble must not stop the others' updates
            log.warning("could not refresh job %s: %s", row.id, exc)


async def _refresh_forever(services: Services, refresh_s: float, webhook: Webhook | None) -> None:
    while True:
        await asyncio.to_thread(refresh_active, services)
        if webhook is not None:
            await asyncio.to_thread(deliver_pending, webhook, services.records)
        await asyncio.sleep(refresh_s)
