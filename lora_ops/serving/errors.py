"""A replica's errors in OpenAI's shape, and the OpenAPI schema that tells the truth about them.

Every refusal is ``{"error": {"message", "type", "param", "code"}}``. FastAPI documents a
422 for every route with a body; this app answers bad input with 400 instead, and has
statuses of its own (401, 403, 404, 413, 429, 503). Documenting them lets clients, and the
schema fuzz test, check real answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_ops.errors import InputError, LoraOpsError
from lora_ops.serving.access import AccessDenied
from lora_ops.serving.engine import Overloaded, UnknownModel
from lora_ops.serving.limits import BodyTooLarge
from lora_ops.serving.openai_errors import (
    denied,
    http_error,
    input_error,
    openai_error,
    too_large,
)
from lora_ops.serving.schemas import ErrorResponse
from lora_ops.serving.sources import SourceUnavailable

_ERROR: dict[str, Any] = {"model": ErrorResponse}
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Bad input (OpenAI's invalid_request_error)."},
    413: {**_ERROR, "description": "The body is too large."},
    503: {**_ERROR, "description": "Shutting down, or an adapter store is unreachable."},
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_ERROR, "description": "No valid bearer token."},
    403: {**_ERROR, "description": "The token may not do this."},
}
INFERENCE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMON_RESPONSES,
    **AUTH_RESPONSES,
    404: {**_ERROR, "description": "No such model."},
    429: {
        **_ERROR,
        "description": "The request queue is full; retry after Retry-After seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMON_RESPONSES,
    **AUTH_RESPONSES,
    404: {**_ERROR, "description": "No adapter of that name (unload)."},
}


# -- one handler per error kind --------------------------------------------------------------


async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A check of the request's own names its field; a union's other branches only echo it.
    ours = [e for e in errors if isinstance(e.get("ctx", {}).get("error"), InputError)]
    first = (ours or errors)[0]
    if first.get("type") == "json_invalid":
        return openai_error(400, "the body is not valid JSON", "invalid_request_error")
    param = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    if first.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
        message = f"Unrecognized request argument supplied: {param}"
        return openai_error(400, message, "invalid_request_error", param=param)
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # e.g. a bad role
        param += "." + str(first["ctx"]["discriminator"]).strip("'")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, InputError):  # a check of the request's own: it names its field
        param = cause.field or param
        return openai_error(400, f"{param}: {cause.reason}", "invalid_request_error", param=param)
    return openai_error(400, f"{param}: {first['msg']}", "invalid_request_error", param=param)


async def _unknown_model(_: Request, exc: UnknownModel) -> JSONResponse:
    return openai_error(404, str(exc), "invalid_request_error", "model_not_found", "model")


async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
    retry = {"Retry-After": str(exc.retry_after_s)}
    return openai_error(429, str(exc), "rate_limit_exceeded", "queue_full", headers=retry)


async def _unavailable(_: Request, exc: SourceUnavailable) -> JSONResponse:
    return openai_error(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})


async def _refused(_: Request, exc: LoraOpsError) -> JSONResponse:
    # Shutting down, and other states the caller can only wait out.
    return openai_error(503, str(exc), "service_unavailable")


# Starlette picks the handler of the most specific class in an exception's MRO, so the
# LoraOpsError catch-all shadows none of its subclasses here (InputError, Overloaded, ...).
_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    RequestValidationError: _bad_request,
    StarletteHTTPException: http_error,
    UnknownModel: _unknown_model,
    InputError: input_error,
    AccessDenied: denied,
    Overloaded: _overloaded,
    BodyTooLarge: too_large,
    SourceUnavailable: _unavailable,
    LoraOpsError: _refused,
}


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error kind the replica knows in OpenAI's shape."""
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)


# -- the schema ------------------------------------------------------------------------------


def document_errors(app: FastAPI) -> None:
    """Build the schema once, without the 422 responses this app never sends."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    _json_errors(operation.get("responses", {}))
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _json_errors(responses: dict[str, Any]) -> None:
    """Drop FastAPI's 422; errors are JSON even on routes that answer 200 in plain text."""
    responses.pop("422", None)
    for status, response in responses.items():
        content = response.get("content", {})
        if int(status) >= 400 and content and "application/json" not in content:
            response["content"] = {"application/json": next(iter(content.values()))}
