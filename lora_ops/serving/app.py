"""The HTTP face of a replica: OpenAI-compatible inference, vLLM's adapter admin, metrics.

``create_app(engine, admin_token)`` builds the FastAPI app; routes parse, call the engine
and shape the answer. Errors use OpenAI's shape: ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lora_ops.errors import InputError
from lora_ops.serving.access import Access, AccessDenied, KeyGrant
from lora_ops.serving.engine import AdapterSource, Engine, UnknownModel
from lora_ops.serving.generation import GenerationResult, SamplingParams
from lora_ops.serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)

DEFAULT_MAX_TOKENS = 64


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _EngineCollector(Collector):
    """Engine counters, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        stats = self.engine.stats
        for name, value, doc in (
            ("lora_ops_cache_hits", stats.cache_hits, "Adapter cache hits."),
            ("lora_ops_cache_misses", stats.cache_misses, "Adapter cache misses (loads)."),
            ("lora_ops_cache_evictions", stats.evictions, "Adapters evicted from the cache."),
            ("lora_ops_generated_tokens", stats.generated_tokens, "Tokens generated."),
            ("lora_ops_prompt_tokens", stats.prompt_tokens, "Prompt tokens processed."),
            ("lora_ops_batches", stats.batches, "Decoding batches run."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        sizes = GaugeMetricFamily(
            "lora_ops_batch_size_batches", "Batches run, by size.", labels=["size"]
        )
        for size, count in sorted(stats.batch_sizes.items()):
            sizes.add_metric([str(size)], count)
        yield sizes
        yield GaugeMetricFamily(
            "lora_ops_max_batch_size",
            "Largest batch run so far.",
            value=max(stats.batch_sizes, default=0),
        )
        yield GaugeMetricFamily(
            "lora_ops_loaded_adapters",
            "Adapters registered on this replica.",
            value=len(self.engine.models()) - 1,
        )
        yield GaugeMetricFamily(
            "lora_ops_resident_adapters",
            "Adapters in memory now.",
            value=len(self.engine.resident_adapters()),
        )


def create_app(
    engine: Engine, admin_token: str | None = None, api_keys: dict[str, KeyGrant] | None = None
) -> FastAPI:
    """A FastAPI app serving ``engine``; admin routes need ``Bearer <admin_token>``.

    With ``api_keys`` (sha256(key) -> grant), inference needs a key, and a customer-bound
    key reaches only that customer's adapter (and ``base`` when allowed).
    """
    access = Access(admin_token, api_keys)
    app = FastAPI(title="lora-ops replica", version="1")
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    requests_total = Counter(
        "lora_ops_requests", "Requests by route and status.", ["route", "status"], registry=registry
    )
    latency = Histogram(
        "lora_ops_request_seconds", "Request latency.", ["route"], registry=registry
    )
    app.state.engine = engine

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[..., Any]) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.url.path
        latency.labels(route).observe(time.perf_counter() - started)
        requests_total.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return openai_error(400, f"{param}: {first['msg']}", "invalid_request_error", param=param)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
        return openai_error(404, str(exc), "invalid_request_error", "model_not_found", "model")

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return openai_error(400, str(exc), "invalid_request_error", param=exc.field)

    @app.exception_handler(AccessDenied)
    async def denied(_: Request, exc: AccessDenied) -> JSONResponse:
        return openai_error(exc.status, exc.message, exc.kind)

    app.state.ready = True

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse | dict[str, str]:
        # Not ready while production adapters are still loading at start-up.
        if not app.state.ready:
            return JSONResponse({"status": "loading", "base": engine.base}, status_code=503)
        return {"status": "ok", "base": engine.base}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        grant = access.grant(request.headers.get("authorization"))
        # vLLM's shape: an adapter's root is where it was loaded from, its parent the base.
        now = int(time.time())
        data = [
            {
                "id": "base",
                "object": "model",
                "created": now,
                "owned_by": "lora-ops",
                "root": engine.base,
                "parent": None,
            }
        ]
        if grant is not None and not grant.allow_base:
            data = []
        for name in engine.models()[1:]:
            if grant is not None and not grant.allows(name):
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "lora-ops",
                    "root": engine.source_of(name),
                    "parent": "base",
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        access.require_model(request.headers.get("authorization"), body.model)
        ids = engine.encode_text(body.prompt)
        return await _respond(engine, body, ids, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | dict[str, Any]:
        access.require_model(request.headers.get("authorization"), body.model)
        ids = engine.encode_chat([m.model_dump() for m in body.messages])
        return await _respond(engine, body, ids, chat=True)

    @app.post("/v1/load_lora_adapter", response_model=None)
    async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> Response:
        access.require_admin(request.headers.get("authorization"))
        source = AdapterSource(body.lora_path, body.sha256)
        await asyncio.to_thread(engine.load_adapter, body.lora_name, source)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_model=None)
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> Response:
        access.require_admin(request.headers.get("authorization"))
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _respond(
    engine: Engine, body: CompletionRequest | ChatCompletionRequest, ids: list[int], chat: bool
) -> Response | dict[str, Any]:
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    params = body.model_copy(update={"max_tokens": limit}).sampling(DEFAULT_MAX_TOKENS)
    if body.stream:
        return StreamingResponse(
            _stream(engine, body.model, ids, params, chat), media_type="text/event-stream"
        )
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


async def _stream(
    engine: Engine, model: str, ids: list[int], params: SamplingParams, chat: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shape, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(_: int, text: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, text)

    future = engine.submit(ids, model, params, on_text=on_text)
    done = asyncio.wrap_future(future)
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
    result = done.result()
    yield _chunk(chunk_id, model, chat, "" if not chat else {}, result.finish_reason)
    yield "data: [DONE]\n\n"


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
