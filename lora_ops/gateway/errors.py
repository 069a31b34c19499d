"""The gateway's refusals in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

The replica's handlers (:mod:`lora_ops.serving.errors`) cannot be imported here: that
module brings the engine, and with it torch, into a process that never runs a model. The
shape is the same, so a client cannot tell whether the gateway or a replica refused it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_ops.errors import InputError
from lora_ops.serving.access import AccessDenied
from lora_ops.serving.limits import BodyTooLarge

RETRY_AFTER_S = 5  # what a caller is told to wait when no replica can answer


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


def unavailable(message: str) -> JSONResponse:
    """No replica can answer now: a 503 the caller may retry after a while."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    return openai_error(503, message, "service_unavailable", headers=retry)


def unknown_model(model: str) -> JSONResponse:
    message = f"the model {model!r} does not exist"  # a replica's words
    return openai_error(404, message, "invalid_request_error", "model_not_found", "model")


def error_event(message: str) -> bytes:
    """A stream's last event when it breaks after its status line was sent: OpenAI's
    clients raise the error they find in an event's data."""
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n".encode()


async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return openai_error(400, str(exc), "invalid_request_error", param=exc.field)


async def _denied(_: Request, exc: AccessDenied) -> JSONResponse:
    return openai_error(exc.status, exc.message, exc.kind)


async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
    return openai_error(413, str(exc), "invalid_request_error", "request_too_large")


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # No such route, a wrong method: OpenAI's shape too, keeping headers such as Allow.
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    response = openai_error(exc.status_code, str(exc.detail), kind)
    response.headers.update(exc.headers or {})
    return response


_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    InputError: _input_error,
    AccessDenied: _denied,
    BodyTooLarge: _too_large,
    StarletteHTTPException: _http_error,
}


def add_error_handlers(app: FastAPI) -> None:
    """Answer the gateway's own refusals in OpenAI's shape."""
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)
