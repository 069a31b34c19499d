"""The HTTP face of a replica: ``create_app`` builds the FastAPI app around an engine.

The routes live in :mod:`~lora_ops.serving.routes`, server-sent events in
:mod:`~lora_ops.serving.streaming`, and the errors, in OpenAI's shape ``{"error":
{"message", "type", "param", "code"}}`` and documented in the schema, in
:mod:`~lora_ops.serving.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lora_ops.serving.access import Access, KeyGrant
from lora_ops.serving.engine import Engine
from lora_ops.serving.errors import add_error_handlers, document_errors
from lora_ops.serving.limits import BodyLimit
from lora_ops.serving.metrics import replica_metrics
from lora_ops.serving.routes import ROUTERS, ReplicaState, replica_of


def create_app(
    engine: Engine, admin_token: str | None = None, api_keys: dict[str, KeyGrant] | None = None
) -> FastAPI:
    """A FastAPI app serving ``engine``; admin routes need ``Bearer <admin_token>``.

    With ``api_keys`` (sha256(key) -> grant), inference needs a key, and a customer-bound
    key reaches only that customer's adapter (and ``base`` when allowed). While
    ``app.state.ready`` is False (production adapters still loading), /health answers 503.
    """
    app = FastAPI(title="lora-ops replica", version="1")
    for router in ROUTERS:
        app.include_router(router)
    access = Access(admin_token, api_keys)
    app.state.replica = ReplicaState(engine, access, replica_metrics(engine), _paths(app))
    app.state.ready = True
    app.add_middleware(BodyLimit)
    app.middleware("http")(_measure)  # added last, so outside BodyLimit: a 413 is counted
    add_error_handlers(app)
    document_errors(app)
    return app


async def _measure(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Count and time every request by route; paths the app does not have share "other"."""
    replica = replica_of(request.app)
    started = time.perf_counter()
    response = await call_next(request)
    route = request.url.path if request.url.path in replica.paths else "other"
    replica.metrics.latency.labels(route).observe(time.perf_counter() - started)
    replica.metrics.requests.labels(route, str(response.status_code)).inc()
    return response


def _paths(app: FastAPI) -> frozenset[str]:
    """Every path the app answers: its own (the schema and docs) and its routers'.

    Read from the routers themselves: FastAPI may keep an included router as one entry
    of ``app.routes`` rather than copying its routes there.
    """
    routes = [*app.routes, *(route for router in ROUTERS for route in router.routes)]
    return frozenset(route.path for route in routes if hasattr(route, "path"))
