"""The gateway's routes: OpenAI's inference API, forwarded; the model list; health, metrics.

Only what the gateway must know is read from a body: that it is a JSON object naming a
model, and whether it asks for a stream. The replica checks the rest and its refusal comes
back unchanged, so the gateway never disagrees with a replica about what is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lora_ops.errors import InputError
from lora_ops.gateway.load import Load
from lora_ops.gateway.metrics import GatewayMetrics
from lora_ops.gateway.proxy import Proxy
from lora_ops.gateway.routing import Router
from lora_ops.gateway.timing import Timing
from lora_ops.gateway.traffic import Traffic
from lora_ops.serving.access import Access

CLIENT_CLOSED_REQUEST = 499  # nginx's status for an answer nobody is left to read
routes = APIRouter()


@dataclass(frozen=True)
class GatewayState:
    """What every route shares; ``create_gateway`` keeps it on ``app.state.gateway``."""

    router: Router
    access: Access
    load: Load
    metrics: GatewayMetrics
    proxy: Proxy
    traffic: Traffic  # requests per model, taken by whoever sizes customers' placement


def gateway_of(app: Any) -> GatewayState:
    state: GatewayState = app.state.gateway
    return state


def read_model(body: bytes) -> tuple[str, bool]:
    """The model a request body names, and whether it asks for a stream.

    Raises:
        InputError: the body is not a JSON object with a string ``model``.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        raise InputError("the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InputError("the body must be a JSON object", field="body")
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        raise InputError("a model name (a string) is required", field="model")
    return model, parsed.get("stream") is True


@routes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    body = generate_latest(gateway_of(request.app).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@routes.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The fleet's models that the caller's key reaches, in the replica's shape."""
    gateway = gateway_of(request.app)
    grant = gateway.access.grant(request.headers.get("authorization"))
    now = int(time.time())
    data = [
        {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "lora-ops",
            "root": name,  # a caller does not learn where a replica loaded it from
            "parent": None if name == "base" else "base",
        }
        for name in gateway.router.models()
        if grant is None or grant.allows(name)
    ]
    return {"object": "list", "data": data}


@routes.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _forward(request, "/v1/completions")


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _forward(request, "/v1/chat/completions")


async def _forward(request: Request, path: str) -> Response:
    """Check the body and the caller's key at the door, then forward the body unchanged.

    A malformed body is a 400 for any caller, its key checked after, as on a replica.
    """
    gateway = gateway_of(request.app)
    body = await request.body()
    model, stream = read_model(body)
    gateway.access.require_model(request.headers.get("authorization"), model)
    timing: Timing = request.state.timing
    forwarding = asyncio.ensure_future(gateway.proxy.forward(path, body, model, stream, timing))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({forwarding, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not forwarding.done():
        # The caller went away: closing the replica's connection lets it drop the work.
        forwarding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarding
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    gone.cancel()
    return forwarding.result()


async def _disconnected(request: Request) -> None:
    """Return once the caller has gone away.

    The body is read already, so the next message the server delivers is the disconnect.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass
