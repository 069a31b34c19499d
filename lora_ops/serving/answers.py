"""What a request asks of the engine (:class:`Work`), and its answer in OpenAI's shape.

A request becomes prompts (one per completion prompt, one for a chat), how many choices
each returns (``n``) and generates (``best_of``), sampling parameters, a grammar when the
reply's form is fixed (``response_format``, or tools the reply must call), and how the
reply is read (tool calls parsed out of it). Tokenizing and compiling a grammar take
milliseconds, so :func:`chat_work` and :func:`completion_work` run off the event loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_ops.chat import ParsedReply, parse_tool_calls
from lora_ops.generation import GenerationResult, SamplingParams, TokenLogprob
from lora_ops.serving.engine import Engine
from lora_ops.serving.grammar import Grammar
from lora_ops.serving.requests import ChatCompletionRequest, CompletionRequest, NamedToolChoice

DEFAULT_MAX_TOKENS = 64


@dataclass
class Work:
    """What one request asks of the engine, and how its answers are shaped."""

    model: str
    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    n: int  # choices returned per prompt
    best_of: int  # choices generated per prompt, the likeliest n returned
    stream: bool = False
    grammar: Grammar | None = None
    tool_names: list[str] = field(default_factory=list)  # parse calls of these tools
    single_call: bool = False  # parallel_tool_calls false: at most one call
    forced_calls: bool = False  # the grammar allows calls only: no text is content
    echo: list[str] = field(default_factory=list)  # per prompt: text put before the answer
    logprobs: bool = False  # the caller asked for them
    include_usage: bool = False
    obfuscate: bool = False

    def parses_tools(self) -> bool:
        return bool(self.tool_names)


def chat_work(body: ChatCompletionRequest, engine: Engine) -> Work:
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    ids = engine.encode_chat(messages, tools or None)
    grammar = _chat_grammar(body, engine, tools)
    top = body.top_logprobs or 0
    limit = body.max_completion_tokens or body.max_tokens
    options = body.stream_options
    return Work(
        model=body.model,
        chat=True,
        prompts=[ids],
        params=body.sampling(_max_tokens(engine, limit, ids), top if body.logprobs else None),
        n=body.n or 1,
        best_of=body.n or 1,
        stream=bool(body.stream),
        grammar=grammar,
        tool_names=[] if body.tool_choice == "none" else [t["function"]["name"] for t in tools],
        single_call=body.parallel_tool_calls is False,
        forced_calls=body.forced_calls(),
        logprobs=bool(body.logprobs),
        include_usage=bool(options and options.include_usage),
        obfuscate=bool(options and options.include_obfuscation),
    )


def _chat_grammar(
    body: ChatCompletionRequest, engine: Engine, tools: list[dict[str, Any]]
) -> Grammar | None:
    if body.forced_calls():
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        return engine.grammars.tool_calls(tools, parallel=body.parallel_tool_calls is not False)
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object" or form.json_schema is None:
        return engine.grammars.json_schema({"type": "object"}, field="response_format")
    schema = form.json_schema.schema_ or {"type": "object"}
    return engine.grammars.json_schema(schema, field="response_format.json_schema.schema")


def completion_work(body: CompletionRequest, engine: Engine) -> Work:
    prompts = [engine.encode_text(p) if isinstance(p, str) else p for p in body.prompts()]
    longest = max(prompts, key=len)
    best_of = body.best_of or body.n or 1
    # best_of needs every choice's likelihood to rank them, asked for or not.
    logprobs = body.logprobs if body.logprobs is not None else (0 if best_of > 1 else None)
    options = body.stream_options
    return Work(
        model=body.model,
        chat=False,
        prompts=prompts,
        params=body.sampling(_max_tokens(engine, body.max_tokens, longest), logprobs),
        n=body.n or 1,
        best_of=best_of,
        stream=bool(body.stream),
        echo=[_echo_text(engine, p) for p in body.prompts()] if body.echo else [],
        logprobs=body.logprobs is not None,
        include_usage=bool(options and options.include_usage),
        obfuscate=bool(options and options.include_obfuscation),
    )


def _echo_text(engine: Engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.decode(prompt)


def _max_tokens(engine: Engine, asked: int | None, prompt: list[int]) -> int:
    if asked is not None:
        return asked
    # OpenAI's default is as much as fits; here that is capped at a short answer.
    return max(1, min(DEFAULT_MAX_TOKENS, engine.room(len(prompt))))


# -- answers ---------------------------------------------------------------------------------


def best_choices(results: Sequence[GenerationResult], n: int) -> list[GenerationResult]:
    """The ``n`` likeliest of ``results`` (by their tokens' summed logprobs), in order."""
    if len(results) == n:
        return list(results)
    ranked = sorted(results, key=lambda r: -sum(t.logprob for t in r.logprobs or ()))
    return ranked[:n]


def reply_of(work: Work, text: str) -> ParsedReply:
    """The reply's text and the tool calls in it."""
    if not work.parses_tools():
        return ParsedReply(text, [])
    parsed = parse_tool_calls(text, work.tool_names)
    calls = parsed.tool_calls[:1] if work.single_call else parsed.tool_calls
    # Forced calls cut short by max_tokens leave part of a call: not something said.
    return ParsedReply(None if work.forced_calls else parsed.content, calls)


def completion_body(
    work: Work, engine: Engine, answers: Sequence[Sequence[GenerationResult]]
) -> dict[str, Any]:
    """The non-streamed body: ``answers[i]`` are the returned choices of prompt i."""
    choices = []
    for prompt_index, results in enumerate(answers):
        for offset, result in enumerate(results):
            index = prompt_index * work.n + offset
            choices.append(_choice(work, engine, index, prompt_index, result))
    prompt_tokens = sum(len(p) for p in work.prompts)
    generated = sum(len(r.token_ids) for results in answers for r in results)
    kind = "chat.completion" if work.chat else "text_completion"
    return {
        "id": new_id(work.chat),
        "object": kind,
        "created": int(time.time()),
        "model": work.model,
        "choices": choices,
        "usage": usage(prompt_tokens, generated),
    }


def _choice(
    work: Work, engine: Engine, index: int, prompt_index: int, result: GenerationResult
) -> dict[str, Any]:
    if not work.chat:
        prefix = work.echo[prompt_index] if work.echo else ""
        logprobs = None
        if work.logprobs:
            logprobs = completion_logprobs(engine, result.logprobs or [], len(prefix))
        text = prefix + result.text
        return {
            "index": index,
            "text": text,
            "finish_reason": result.finish_reason,
            "logprobs": logprobs,
        }
    reply = reply_of(work, result.text)
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [call.openai() for call in reply.tool_calls]
    finish = "tool_calls" if reply.tool_calls else result.finish_reason
    logprobs = chat_logprobs(engine, result.logprobs or []) if work.logprobs else None
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}


def chat_logprobs(engine: Engine, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, bytes, logprob and the likeliest others."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = engine.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    engine: Engine, tokens: Sequence[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy completions shape: parallel lists, ``text_offset`` in characters."""
    texts = [engine.token_text(t.token) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{engine.token_text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
