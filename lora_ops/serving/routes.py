"""A replica's routes: OpenAI's inference API, vLLM's adapter admin, health and metrics.

A route parses, calls the engine and shapes the answer. What the routes share reaches them
through dependencies: :data:`Replica` reads ``app.state``, and the dependency that hands a
route its body checks first that the caller may send it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lora_ops import base_models
from lora_ops.serving import answers, schemas
from lora_ops.serving.access import Access, KeyGrant
from lora_ops.serving.answers import Work
from lora_ops.serving.engine import BASE_MODEL_NAME, AdapterSource, Engine
from lora_ops.serving.errors import ADMIN_RESPONSES, INFERENCE_RESPONSES
from lora_ops.serving.metrics import ReplicaMetrics
from lora_ops.serving.requests import ChatCompletionRequest, CompletionRequest
from lora_ops.serving.streaming import json_or_events, start_stream, submit_all

CLIENT_CLOSED_REQUEST = 499  # nginx's status for an answer nobody is left to read
# "resident" or "cold": whether the adapter was in the model when the request arrived. The
# gateway counts cold answers per replica: routing that made a replica load an adapter.
ADAPTER_HEADER = "x-lora-ops-adapter"
requests_log = logging.getLogger("lora_ops.serving.requests")

# -- what the routes share -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaState:
    """What every route shares; ``create_app`` keeps it on ``app.state.replica``."""

    engine: Engine
    access: Access
    metrics: ReplicaMetrics
    paths: frozenset[str]  # the app's own; metrics label every other path "other"


def replica_of(app: Any) -> ReplicaState:
    state: ReplicaState = app.state.replica
    return state


async def _replica(request: Request) -> ReplicaState:
    return replica_of(request.app)


Replica = Annotated[ReplicaState, Depends(_replica)]

# -- who may call ----------------------------------------------------------------------------
# A dependency's own dependencies are solved before its body is checked, so each check below
# takes the body itself: it then runs only once the body is valid, and a malformed request
# is a 400 for any caller, its key checked after.


def _authorization(request: Request) -> str | None:
    return request.headers.get("authorization")


async def _caller_grant(request: Request, replica: Replica) -> KeyGrant | None:
    return replica.access.grant(_authorization(request))


async def _completion_for_caller(
    body: CompletionRequest, request: Request, replica: Replica
) -> CompletionRequest:
    replica.access.require_model(_authorization(request), body.model)
    return body


async def _chat_for_caller(
    body: ChatCompletionRequest, request: Request, replica: Replica
) -> ChatCompletionRequest:
    replica.access.require_model(_authorization(request), body.model)
    return body


async def _load_by_admin(
    body: schemas.LoadLoraAdapterRequest, request: Request, replica: Replica
) -> schemas.LoadLoraAdapterRequest:
    replica.access.require_admin(_authorization(request))
    return body


async def _unload_by_admin(
    body: schemas.UnloadLoraAdapterRequest, request: Request, replica: Replica
) -> schemas.UnloadLoraAdapterRequest:
    replica.access.require_admin(_authorization(request))
    return body


CallerGrant = Annotated[KeyGrant | None, Depends(_caller_grant)]  # None: every model
CompletionForCaller = Annotated[CompletionRequest, Depends(_completion_for_caller)]
ChatForCaller = Annotated[ChatCompletionRequest, Depends(_chat_for_caller)]
LoadByAdmin = Annotated[schemas.LoadLoraAdapterRequest, Depends(_load_by_admin)]
UnloadByAdmin = Annotated[schemas.UnloadLoraAdapterRequest, Depends(_unload_by_admin)]

# -- the routers, by who may call them -------------------------------------------------------

health_routes = APIRouter()  # anyone
inference_routes = APIRouter()  # an API key reaching the model, where keys are configured
admin_routes = APIRouter()  # the admin token
metrics_routes = APIRouter()  # anyone
# In this order the schema lists the paths as it always has.
ROUTERS = (health_routes, inference_routes, admin_routes, metrics_routes)


@health_routes.get(
    "/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}}
)
async def health(request: Request, replica: Replica) -> Any:
    name, sha256 = await asyncio.to_thread(base_identity, replica.engine.base)
    # Not ready while production adapters are still loading at start-up.
    if not request.app.state.ready:
        loading = {"status": "loading", "base": name, "base_sha256": sha256}
        return JSONResponse(loading, status_code=503)
    return schemas.Health(status="ok", base=name, base_sha256=sha256)


@functools.cache
def base_identity(base: str) -> tuple[str, str]:
    """The base's catalogue name (or folder) and weights' sha256, read once."""
    folder = base_models.resolve_base(base)
    return base_models.base_name(folder), base_models.base_sha256(folder)


@inference_routes.get("/v1/models", responses=INFERENCE_RESPONSES)
async def list_models(grant: CallerGrant, replica: Replica) -> schemas.ModelList:
    # vLLM's shape: an adapter's root is where it was loaded from, its parent the base.
    engine = replica.engine
    now = int(time.time())
    cards: list[tuple[str, str, str | None]] = []
    if grant is None or grant.allow_base:
        cards.append(("base", engine.base, None))
    for name in engine.models()[1:]:
        if grant is None:
            cards.append((name, engine.source_of(name), "base"))
        elif grant.allows(name):  # a customer does not learn the replica's paths
            cards.append((name, name, "base"))
    data = [
        schemas.ModelCard(
            id=name, object="model", created=now, owned_by="lora-ops", root=root, parent=parent
        )
        for name, root, parent in cards
    ]
    return schemas.ModelList(object="list", data=data)


@inference_routes.post(
    "/v1/completions",
    response_model=None,
    responses={200: json_or_events(schemas.CompletionResponse), **INFERENCE_RESPONSES},
)
async def completions(
    body: CompletionForCaller, request: Request, response: Response, replica: Replica
) -> Response | dict[str, Any]:
    residency = _residency(replica.engine, body.model)
    work = await asyncio.to_thread(answers.completion_work, body, replica.engine)
    answer = await _respond(replica.engine, work, request, body.user, None)
    return _marked(answer, response, residency)


@inference_routes.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: json_or_events(schemas.ChatCompletionResponse), **INFERENCE_RESPONSES},
)
async def chat_completions(
    body: ChatForCaller, request: Request, response: Response, replica: Replica
) -> Response | dict[str, Any]:
    residency = _residency(replica.engine, body.model)
    work = await asyncio.to_thread(answers.chat_work, body, replica.engine)
    answer = await _respond(replica.engine, work, request, body.user, body.safety_identifier)
    return _marked(answer, response, residency)


@admin_routes.post(
    "/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES
)
async def load_lora_adapter(body: LoadByAdmin, replica: Replica) -> str:
    source = AdapterSource(body.lora_path, body.sha256)
    await asyncio.to_thread(replica.engine.load_adapter, body.lora_name, source)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@admin_routes.post(
    "/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES
)
async def unload_lora_adapter(body: UnloadByAdmin, replica: Replica) -> str:
    await asyncio.to_thread(replica.engine.unload_adapter, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


@metrics_routes.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(replica: Replica) -> Response:
    body = generate_latest(replica.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# -- answers ---------------------------------------------------------------------------------


def _residency(engine: Engine, model: str) -> str | None:
    """The :data:`ADAPTER_HEADER` value for a request arriving now; None for the base."""
    if model == BASE_MODEL_NAME:
        return None
    return "resident" if engine.cache.is_resident(model) else "cold"


def _marked(
    answer: Response | dict[str, Any], response: Response, residency: str | None
) -> Response | dict[str, Any]:
    """``answer`` carrying ``residency``. A body returned as a dict gets the headers of
    the ``response`` FastAPI handed the route; a response returned whole, its own."""
    if residency is not None:
        headers = answer.headers if isinstance(answer, Response) else response.headers
        headers[ADAPTER_HEADER] = residency
    return answer


async def _respond(
    engine: Engine, work: Work, request: Request, user: str | None, safety_id: str | None
) -> Response | dict[str, Any]:
    if user or safety_id:  # kept where abuse is looked into: the replica's log
        who = "request for %s: user=%s safety_identifier=%s"
        requests_log.info(who, work.model, user, safety_id)
    if work.stream:
        return await start_stream(engine, work)
    futures = submit_all(engine, work)
    answer = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not answer.done():  # the client went away: its rows are dropped at the next step
        for future in futures:
            future.cancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    gone.cancel()
    if answer.exception() is not None:  # one choice failed: the others are not wanted
        for future in futures:
            future.cancel()
    results = answer.result()
    per_prompt = [
        answers.best_choices(results[i : i + work.best_of], work.n)
        for i in range(0, len(results), work.best_of)
    ]
    return answers.completion_body(work, engine, per_prompt)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away.

    The body is read already, so the next message the server delivers is the disconnect.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass
