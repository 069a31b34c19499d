"""The HTTP face of a replica: OpenAI-compatible inference, vLLM's adapter admin, metrics.

``create_app(engine, admin_token)`` builds the FastAPI app; routes parse, call the engine
and shape the answer. Errors use OpenAI's shape: ``{"error": {"message", "type",
"param", "code"}}``, and the OpenAPI schema documents every status a route answers with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_ops.errors import InputError, LoraOpsError
from lora_ops.generation import GenerationResult, SamplingParams
from lora_ops.serving import schemas
from lora_ops.serving.access import Access, AccessDenied, KeyGrant
from lora_ops.serving.engine import AdapterSource, Engine, Overloaded, UnknownModel
from lora_ops.serving.limits import BodyLimit, BodyTooLarge
from lora_ops.serving.metrics import replica_metrics
from lora_ops.serving.openapi import ADMIN_RESPONSES, INFERENCE_RESPONSES, document_errors
from lora_ops.serving.schemas import ChatCompletionRequest, CompletionRequest
from lora_ops.serving.sources import SourceUnavailable

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 64


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(  # noqa: C901 - to be split into routers
    engine: Engine, admin_token: str | None = None, api_keys: dict[str, KeyGrant] | None = None
) -> FastAPI:
    """A FastAPI app serving ``engine``; admin routes need ``Bearer <admin_token>``.

    With ``api_keys`` (sha256(key) -> grant), inference needs a key, and a customer-bound
    key reaches only that customer's adapter (and ``base`` when allowed).
    """
    access = Access(admin_token, api_keys)
    app = FastAPI(title="lora-ops replica", version="1")
    metrics = replica_metrics(engine)
    app.state.engine = engine
    app.state.ready = True
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[..., Any]) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.url.path if request.url.path in app.state.paths else "other"
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    _add_error_handlers(app)

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def health() -> Any:
        # Not ready while production adapters are still loading at start-up.
        if not app.state.ready:
            return JSONResponse({"status": "loading", "base": engine.base}, status_code=503)
        return schemas.Health(status="ok", base=engine.base)

    @app.get("/v1/models", responses=INFERENCE_RESPONSES)
    async def list_models(request: Request) -> schemas.ModelList:
        grant = access.grant(request.headers.get("authorization"))
        # vLLM's shape: an adapter's root is where it was loaded from, its parent the base.
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

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: _ok(schemas.CompletionResponse), **INFERENCE_RESPONSES},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        access.require_model(request.headers.get("authorization"), body.model)
        ids = await asyncio.to_thread(engine.encode_text, body.prompt)
        return await _respond(engine, body, ids, chat=False)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: _ok(schemas.ChatCompletionResponse), **INFERENCE_RESPONSES},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | dict[str, Any]:
        access.require_model(request.headers.get("authorization"), body.model)
        messages = [m.model_dump() for m in body.messages]
        ids = await asyncio.to_thread(engine.encode_chat, messages)
        return await _respond(engine, body, ids, chat=True)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES)
    async def load_lora_adapter(body: schemas.LoadLoraAdapterRequest, request: Request) -> str:
        access.require_admin(request.headers.get("authorization"))
        source = AdapterSource(body.lora_path, body.sha256)
        await asyncio.to_thread(engine.load_adapter, body.lora_name, source)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post(
        "/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ADMIN_RESPONSES
    )
    async def unload_lora_adapter(body: schemas.UnloadLoraAdapterRequest, request: Request) -> str:
        access.require_admin(request.headers.get("authorization"))
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        body = generate_latest(metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.state.paths = {route.path for route in app.routes if hasattr(route, "path")}
    document_errors(app)
    return app


def _ok(model: type[Any]) -> dict[str, Any]:
    """A 200 that is JSON, or server-sent events when the request asked to stream."""
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {"model": model, "content": {"text/event-stream": {"schema": event}}}


def _add_error_handlers(app: FastAPI) -> None:  # noqa: C901 - one handler per error kind
    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return openai_error(400, "the body is not valid JSON", "invalid_request_error")
        param = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return openai_error(400, f"{param}: {first['msg']}", "invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (an unparsable body, no such route, a wrong
        # method) in OpenAI's shape too, keeping headers such as Allow.
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = openai_error(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
        return openai_error(404, str(exc), "invalid_request_error", "model_not_found", "model")

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return openai_error(400, str(exc), "invalid_request_error", param=exc.field)

    @app.exception_handler(AccessDenied)
    async def denied(_: Request, exc: AccessDenied) -> JSONResponse:
        return openai_error(exc.status, exc.message, exc.kind)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        retry = {"Retry-After": str(exc.retry_after_s)}
        return openai_error(429, str(exc), "rate_limit_exceeded", "queue_full", headers=retry)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return openai_error(413, str(exc), "invalid_request_error", "request_too_large")

    @app.exception_handler(SourceUnavailable)
    async def unavailable(_: Request, exc: SourceUnavailable) -> JSONResponse:
        return openai_error(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(LoraOpsError)
    async def refused(_: Request, exc: LoraOpsError) -> JSONResponse:
        # Shutting down, and other states the caller can only wait out.
        return openai_error(503, str(exc), "service_unavailable")


async def _respond(
    engine: Engine, body: CompletionRequest | ChatCompletionRequest, ids: list[int], chat: bool
) -> Response | dict[str, Any]:
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is None:  # OpenAI's default: as much as fits, here capped at a short answer
        limit = max(1, min(DEFAULT_MAX_TOKENS, engine.room(len(ids))))
    params = body.model_copy(update={"max_tokens": limit}).sampling(DEFAULT_MAX_TOKENS)
    if body.stream:
        return await _start_stream(engine, body.model, ids, params, chat)
    result = await asyncio.wrap_future(engine.submit(ids, body.model, params))
    return _completion_body(body.model, result, chat)


def _completion_body(model: str, result: GenerationResult, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    completion = len(result.token_ids)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
        },
    }


async def _start_stream(
    engine: Engine, model: str, ids: list[int], params: SamplingParams, chat: bool
) -> StreamingResponse:
    """Queue the request and wait for its first text before the status line is sent.

    A refusal (a full queue) or a failure before any text (an adapter that cannot be
    loaded back) is then still an HTTP error status, not a broken stream.
    """
    pieces: asyncio.Queue[str] = asyncio.Queue()
    first_text = asyncio.Event()
    loop = asyncio.get_running_loop()

    def put(text: str) -> None:
        pieces.put_nowait(text)
        first_text.set()

    def on_text(_: int, text: str) -> None:
        loop.call_soon_threadsafe(put, text)

    done = asyncio.wrap_future(engine.submit(ids, model, params, on_text=on_text))
    started: asyncio.Future[Any] = asyncio.ensure_future(first_text.wait())
    waiting: set[asyncio.Future[Any]] = {started, done}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    failure = done.exception() if done.done() and pieces.empty() else None
    if failure is not None:
        raise failure
    return StreamingResponse(_stream(model, done, pieces, chat), media_type="text/event-stream")


async def _stream(
    model: str, done: asyncio.Future[GenerationResult], pieces: asyncio.Queue[str], chat: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shape, ending with ``data: [DONE]``."""
    chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if chat:
        yield _chunk(chunk_id, model, chat, {"role": "assistant", "content": ""}, None)
    while not (done.done() and pieces.empty()):
        getter = asyncio.ensure_future(pieces.get())
        waiting: set[asyncio.Future[Any]] = {getter, done}
        finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield _chunk(chunk_id, model, chat, getter.result(), None)
        else:
            getter.cancel()
    if done.exception() is not None:
        # Failed after the first text: the status line is sent already, so the failure
        # is a last event, in the error shape OpenAI's clients raise from.
        message, kind = _stream_error(done.exception())
        yield f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"
        return
    result = done.result()
    yield _chunk(chunk_id, model, chat, "" if not chat else {}, result.finish_reason)
    yield "data: [DONE]\n\n"


def _stream_error(exc: BaseException | None) -> tuple[str, str]:
    if isinstance(exc, InputError | UnknownModel):
        return str(exc), "invalid_request_error"
    log.error("a streamed request failed: %s", exc)
    return "the request failed on the replica", "server_error"


def _chunk(chunk_id: str, model: str, chat: bool, delta: Any, finish: str | None) -> str:
    if chat:
        content = {"content": delta} if isinstance(delta, str) else delta
        choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    body = {
        "id": chunk_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(body)}\n\n"
