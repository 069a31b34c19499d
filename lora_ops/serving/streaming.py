"""Streamed completions: server-sent events in OpenAI's chunk shape, ending ``data: [DONE]``.

Each choice streams its own deltas (``index`` says which). Where the reply may call tools,
text that could begin a call (``<tool_call>``, or a reply that opens with ``{``) is held
back until it is known: a call is sent as one ``tool_calls`` delta when the choice ends,
text that turned out not to be one as content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from typing import Any

from fastapi.responses import StreamingResponse

from lora_ops.chat import TOOL_CALL_OPEN, ToolCall
from lora_ops.errors import InputError
from lora_ops.generation import Delta, GenerationResult, TokenLogprob
from lora_ops.serving import answers
from lora_ops.serving.answers import Work
from lora_ops.serving.engine import Engine, UnknownModel

log = logging.getLogger(__name__)


def json_or_events(model: type[Any]) -> dict[str, Any]:
    """The documented 200 of a route that streams when asked: JSON, or server-sent events."""
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {"model": model, "content": {"text/event-stream": {"schema": event}}}


async def start_stream(engine: Engine, work: Work) -> StreamingResponse:
    """Queue the request and wait for its first text before the status line is sent.

    A refusal (a full queue) or a failure before any text (an adapter that cannot be
    loaded back) is then still an HTTP error status, not a broken stream.
    """
    deltas: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
    first_text = asyncio.Event()
    loop = asyncio.get_running_loop()

    def put(item: tuple[int, Delta]) -> None:
        deltas.put_nowait(item)
        first_text.set()

    def listener(offset: int) -> Any:
        def on_text(choice: int, delta: Delta) -> None:
            loop.call_soon_threadsafe(put, (offset + choice, delta))

        return on_text

    futures = submit_all(engine, work, listener)
    done = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    started: asyncio.Future[Any] = asyncio.ensure_future(first_text.wait())
    await asyncio.wait({started, done}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    failure = done.exception() if done.done() and deltas.empty() else None
    if failure is not None:
        raise failure
    events = _Events(engine, work, futures, done, deltas)
    return StreamingResponse(events.stream(), media_type="text/event-stream")


def submit_all(engine: Engine, work: Work, listener: Any = None) -> list[Future[Any]]:
    """Every choice of every prompt, in choice order; all or none are queued."""
    futures: list[Future[Any]] = []
    try:
        for index, ids in enumerate(work.prompts):
            on_text = listener(index * work.best_of) if listener else None
            futures += engine.submit_choices(
                ids, work.model, work.params, work.best_of, on_text, work.grammar
            )
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return futures


class _Choice:
    """One choice's stream: text sent, text held back while it may be a tool call."""

    def __init__(self, work: Work, offset: int) -> None:
        self.work = work
        self.sent = ""
        self.held = ""
        self.held_logprobs: list[TokenLogprob] = []
        self.text_offset = offset  # characters before the next token (completions' logprobs)

    def feed(self, delta: Delta) -> tuple[str, list[TokenLogprob]]:
        text = self.held + delta.text
        logprobs = self.held_logprobs + list(delta.logprobs)
        cut = self._hold_from(text) if self.work.parses_tools() else len(text)
        self.held = text[cut:]
        if cut == 0:
            self.held_logprobs = logprobs
            return "", []
        self.sent += text[:cut]
        self.held_logprobs = []
        return text[:cut], logprobs

    def _hold_from(self, text: str) -> int:
        if not self.sent.strip() and text.lstrip().startswith("{"):
            return 0  # the whole reply may be one bare JSON call
        for index in range(len(text)):
            rest = text[index:]
            if rest.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(rest):
                return index
        return len(text)

    def finish(self) -> tuple[str, list[TokenLogprob], list[ToolCall]]:
        """What was held back: as text, or as the tool calls it turned out to be."""
        if not self.held:
            return "", self.held_logprobs, []
        reply = answers.reply_of(self.work, self.held)
        return reply.content or "", self.held_logprobs, reply.tool_calls


class _Events:
    """The stream's events: chunks per choice as text comes, the finish reasons, [DONE]."""

    def __init__(
        self,
        engine: Engine,
        work: Work,
        futures: Sequence[Future[Any]],
        done: asyncio.Future[list[GenerationResult]],
        deltas: asyncio.Queue[tuple[int, Delta]],
    ) -> None:
        self.engine = engine
        self.work = work
        self.futures = futures
        self.done = done
        self.deltas = deltas
        self.id = answers.new_id(work.chat)
        self.choices = [
            _Choice(work, len(work.echo[i // work.n]) if work.echo else 0)
            for i in range(len(futures))
        ]

    async def stream(self) -> AsyncIterator[str]:
        """A client that goes away ends this early; its choices are then cancelled, and the
        engine drops their rows at the next step."""
        try:
            for index in range(len(self.choices)):
                if self.work.chat:
                    yield self._chunk(index, {"role": "assistant", "content": ""})
                elif self.work.echo:
                    yield self._chunk(index, self.work.echo[index // self.work.n])
            async for index, delta in self._deltas():
                text, logprobs = self.choices[index].feed(delta)
                if text:
                    yield self._chunk(index, self._content(text), logprobs=logprobs, of=index)
            if self.done.exception() is not None:
                yield _error_event(self.done.exception())
                return
            for chunk in self._endings(self.done.result()):
                yield chunk
            yield "data: [DONE]\n\n"
        finally:
            for future in self.futures:
                future.cancel()

    async def _deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        while not (self.done.done() and self.deltas.empty()):
            getter = asyncio.ensure_future(self.deltas.get())
            waiting: set[asyncio.Future[Any]] = {getter, self.done}
            finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield getter.result()
            else:
                getter.cancel()

    def _endings(self, results: list[GenerationResult]) -> list[str]:
        chunks = []
        for index, result in enumerate(results):
            text, logprobs, calls = self.choices[index].finish()
            if text or (logprobs and not calls):  # held text, or a held-back token's logprobs
                chunks.append(self._chunk(index, self._content(text), logprobs=logprobs, of=index))
                logprobs = []
            if calls:
                deltas = [{"index": k, **call.openai()} for k, call in enumerate(calls)]
                chunks.append(self._chunk(index, {"tool_calls": deltas}, logprobs, of=index))
            finish = "tool_calls" if calls else result.finish_reason
            chunks.append(self._chunk(index, {} if self.work.chat else "", finish=finish))
        if self.work.include_usage:
            prompt = sum(len(p) for p in self.work.prompts)
            generated = sum(len(r.token_ids) for r in results)
            chunks.append(self._event([], answers.usage(prompt, generated)))
        return chunks

    def _content(self, text: str) -> Any:
        return {"content": text} if self.work.chat else text

    def _chunk(
        self,
        index: int,
        delta: Any,
        logprobs: Sequence[TokenLogprob] = (),
        finish: str | None = None,
        of: int | None = None,
    ) -> str:
        shaped = None
        if self.work.logprobs and of is not None:
            shaped = self._logprobs(of, logprobs)
        key = "delta" if self.work.chat else "text"
        choice = {"index": index, key: delta, "finish_reason": finish, "logprobs": shaped}
        return self._event([choice], None)

    def _logprobs(self, index: int, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.work.chat:
            return answers.chat_logprobs(self.engine, logprobs)
        choice = self.choices[index]
        shaped = answers.completion_logprobs(self.engine, logprobs, choice.text_offset)
        choice.text_offset += sum(len(token) for token in shaped["tokens"])
        return shaped

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.work.chat else "text_completion",
            "created": int(time.time()),
            "model": self.work.model,
            "choices": choices,
        }
        if self.work.include_usage:
            body["usage"] = usage
        if self.work.obfuscate and choices:
            # OpenAI's stream obfuscation: random padding, so a chunk's size does not
            # give away the length of the text in it.
            body["obfuscation"] = secrets.token_urlsafe(secrets.randbelow(12) + 1)
        return f"data: {json.dumps(body)}\n\n"


def _error_event(exc: BaseException | None) -> str:
    """A failure after the first text: the status line is sent already, so the failure
    is a last event, in the error shape OpenAI's clients raise from."""
    if isinstance(exc, InputError | UnknownModel):
        message, kind = str(exc), "invalid_request_error"
    else:
        log.error("a streamed request failed: %s", exc)
        message, kind = "the request failed on the replica", "server_error"
    return f"data: {json.dumps({'error': {'message': message, 'type': kind}})}\n\n"
