"""OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, and the
handlers for refusals that need no engine: bad input, access, size, the framework's own.

Kept apart from :mod:`lora_ops.serving.errors`, which knows the engine's errors and so
imports the engine and torch: the gateway answers in the same shape without either.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_ops.errors import InputError
from lora_ops.serving.access import AccessDenied
from lora_ops.serving.limits import BodyTooLarge


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


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The framework's own refusals (an unparsable body, no such route, a wrong method) in
    # OpenAI's shape too, keeping headers such as Allow.
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    response = openai_error(exc.status_code, str(exc.detail), kind)
    response.headers.update(exc.headers or {})
    return response


async def input_error(_: Request, exc: InputError) -> JSONResponse:
    return openai_error(400, str(exc), "invalid_request_error", param=exc.field)


async def denied(_: Request, exc: AccessDenied) -> JSONResponse:
    return openai_error(exc.status, exc.message, exc.kind)


async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
    return openai_error(413, str(exc), "invalid_request_error", "request_too_large")
