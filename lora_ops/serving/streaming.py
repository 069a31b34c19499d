"""Streamed completions: server-sent events in OpenAI's chunk shape, ending ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from lora_ops.errors import InputError
from lora_ops.generation import GenerationResult, SamplingParams
from lora_ops.serving.engine import Engine, UnknownModel

log = logging.getLogger(__name__)


def json_or_events(model: type[Any]) -> dict[str, Any]:
    """The documented 200 of a route that streams when asked: JSON, or server-sent events."""
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {"model": model, "content": {"text/event-stream": {"schema": event}}}


async def start_stream(
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
    return StreamingResponse(_events(model, done, pieces, chat), media_type="text/event-stream")


async def _events(
    model: str, done: asyncio.Future[GenerationResult], pieces: asyncio.Queue[str], chat: bool
) -> AsyncIterator[str]:
    """The stream's events: a chunk per piece of text, then the finish reason and [DONE].

    A client that goes away ends the generator early; its request is then cancelled, and
    the engine drops its row at the next step.
    """
    try:
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
    finally:
        if not done.done():
            done.cancel()


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
