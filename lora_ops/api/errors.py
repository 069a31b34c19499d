"""The fine-tuning API's refusals in OpenAI's error shape, by exception type."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_ops.api.files import FileTooLarge
from lora_ops.api.jobs import NotFound
from lora_ops.api.keys import Unauthenticated
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.serving.openai_errors import http_error, input_error, openai_error

log = logging.getLogger(__name__)


async def _unauthenticated(_: Request, exc: Unauthenticated) -> JSONResponse:
    return openai_error(401, str(exc), "invalid_request_error", "invalid_api_key")


async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
    return openai_error(404, str(exc), "invalid_request_error", "not_found")


async def _too_large(_: Request, exc: FileTooLarge) -> JSONResponse:
    return openai_error(413, str(exc), "invalid_request_error", "file_too_large", "file")


async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(where) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return openai_error(400, message, "invalid_request_error", param=param)


async def _service_error(_: Request, exc: LoraOpsError) -> JSONResponse:
    # S3, MLflow or Prefect failed us: say which, without a traceback to the client.
    log.warning("fine-tuning API call failed: %s", exc)
    return openai_error(503, f"a service lora-ops depends on failed: {exc}", "server_error")


def install(app: FastAPI) -> None:
    """Answer every refusal the API makes in OpenAI's shape."""
    app.add_exception_handler(Unauthenticated, _unauthenticated)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(FileTooLarge, _too_large)  # type: ignore[arg-type]
    app.add_exception_handler(InputError, input_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(LoraOpsError, _service_error)  # type: ignore[arg-type]
