"""The replica's OpenAPI schema tells the truth about errors.

FastAPI documents a 422 for every route with a body; this app answers bad input with 400
in OpenAI's error shape instead, and has statuses of its own (401, 403, 404, 413, 429,
503). Documenting them lets clients, and the schema fuzz test, check real answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lora_ops.serving.schemas import ErrorResponse

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
