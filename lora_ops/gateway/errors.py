"""The gateway's refusals in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

The body and the engine-free handlers are the replica's own
(:mod:`lora_ops.serving.openai_errors`), so a client cannot tell whether the gateway or a
replica refused it; :mod:`lora_ops.serving.errors` is not imported, as it brings the
engine, and with it torch, into a process that never runs a model.
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
from lora_ops.serving.openai_errors import (
    denied,
    http_error,
    input_error,
    openai_error,
    too_large,
)

RETRY_AFTER_S = 5  # what a caller is told to wait when no replica can answer


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


_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    InputError: input_error,
    AccessDenied: denied,
    BodyTooLarge: too_large,
    StarletteHTTPException: http_error,
}


def add_error_handlers(app: FastAPI) -> None:
    """Answer the gateway's own refusals in OpenAI's shape."""
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)
