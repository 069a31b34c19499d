"""The serving workloads over HTTP, against any OpenAI-compatible server.

The same requests as ``workload.py`` (chat prompts from the sample data, mixed answer
lengths, adapters by power-law popularity), sent as streamed chat completions to a
lora-ops replica or to ``vllm serve --enable-lora``, so both are measured the same way:

- time to first token: when the first server-sent event carrying text arrives;
- end to end: when ``data: [DONE]`` arrives;
- tokens: the server's ``usage`` where it streams one (``stream_options.include_usage``,
  sent only to a server whose OpenAPI schema declares it), else the request's
  ``max_tokens`` when the stream finished for ``length``, else the text events counted.

Counting events alone would undercount: a lora-ops event carries a piece of *text*, and a
token that completes no text (half a UTF-8 character, a special token skipped in decoding)
sends none. With ``ignore_eos`` and no stop strings, ``finish_reason == "length"`` means
the answer reached ``max_tokens`` exactly.

The driver is asyncio (one event loop, one ``httpx.AsyncClient``), not threads: an open
loop at a high rate keeps hundreds of streams in flight, and a thread per stream in the
driver's own process would take the GIL from the timer that stamps their events.

A failed request (an HTTP error, an error event, a stream cut before ``[DONE]``) is kept
out of the timings and listed in :attr:`HttpRun.failures`, so the percentiles describe
answered requests and the caller decides whether a run with failures counts.

    with lora_ops_replica(base, adapters) as replica:
        run = closed_loop_http(replica.url, mixed_length_chats(models, seed=0), clients=8)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from workload import Run, Timing, sample_messages

CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT_S = 600.0  # longest wait for the next event of one stream


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to send: the conversation, the adapter (or base), the length."""

    messages: list[dict[str, str]]
    model: str
    max_tokens: int


@dataclass
class StreamTiming(Timing):
    """A request's clock, plus what its stream said (see the module's note on tokens)."""

    request_index: int = -1
    text_events: int = 0
    finish_reason: str | None = None


@dataclass
class HttpRun(Run):
    """A driver's run; ``timings`` holds the answered requests, ``failures`` the others.

    ``figures()`` needs one answered request at least: check ``failures`` first.
    """

    # Narrower than Run's: these drivers only record StreamTimings (list is invariant).
    timings: list[StreamTiming] = field(default_factory=list)  # type: ignore[assignment]
    failures: list[str] = field(default_factory=list)

    def figures(self, ttft_slo_s: float | None = None) -> dict[str, float]:
        return {**super().figures(ttft_slo_s), "failed": len(self.failures)}


class RequestFailed(Exception):
    """The server refused a request, or its stream broke off or reported an error."""


def mixed_length_chats(
    models: Sequence[str],
    seed: int,
    short: tuple[int, int] = (8, 32),
    long: tuple[int, int] = (128, 256),
    long_share: float = 0.3,
) -> list[ChatRequest]:
    """``workload.mixed_lengths`` keeping the messages: the same seed draws the same requests.

    The random draws come in mixed_lengths' order (conversation, long or short, length), so
    a figure from this driver and one from the in-process driver describe one workload.
    """
    rng = random.Random(seed)
    conversations = sample_messages()
    requests = []
    for model in models:
        messages = rng.choice(conversations)
        low, high = long if rng.random() < long_share else short
        requests.append(ChatRequest(messages, model, rng.randint(low, high)))
    return requests


def describe_chats(requests: Sequence[ChatRequest]) -> dict[str, Any]:
    """The workload's shape, as far as it is known without the server's tokenizer."""
    lengths = [r.max_tokens for r in requests]
    return {
        "requests": len(requests),
        "distinct_models": len({r.model for r in requests}),
        "max_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "max_tokens_max": max(lengths),
    }


# -- what the server understands -------------------------------------------------------------


def supports_stream_options(base_url: str, api_key: str | None = None) -> bool:
    """Whether the server's chat request schema declares ``stream_options``.

    Asked of its OpenAPI schema rather than tried: a server that ignores unknown fields
    would take the field and never send the usage (a lora-ops replica declares and honours
    it, and refuses fields it does not know).
    """
    try:
        response = httpx.get(f"{base_url}/openapi.json", headers=_headers(api_key), timeout=30)
        response.raise_for_status()
        schemas = response.json().get("components", {}).get("schemas", {})
    except (httpx.HTTPError, ValueError):
        return False
    return any(
        "stream_options" in (schema.get("properties") or {})
        for name, schema in schemas.items()
        if "ChatCompletion" in name and "Request" in name
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _body(request: ChatRequest, include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,  # every answer runs to its length, so contenders do equal work
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


# -- one streamed request --------------------------------------------------------------------


async def _stream_one(
    client: httpx.AsyncClient,
    base_url: str,
    request: ChatRequest,
    timing: StreamTiming,
    include_usage: bool,
) -> None:
    """Send ``request`` and stamp ``timing`` from its events; raise RequestFailed."""
    usage_tokens: int | None = None
    timing.submitted = time.perf_counter()
    body = _body(request, include_usage)
    async with client.stream("POST", base_url + CHAT_PATH, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {response.status_code}: {text[:300]}")
        async for line in response.aiter_lines():
            arrived = time.perf_counter()  # before parsing: the event's own time
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                timing.done = arrived
                break
            usage_tokens = _read_event(json.loads(data), timing, arrived) or usage_tokens
    if timing.done is None:
        raise RequestFailed("the stream ended before [DONE]")
    if timing.first is None:  # an answer with no text: its first token came with the end
        timing.first = timing.done
    timing.tokens = _tokens(request, timing, usage_tokens)


def _read_event(event: dict[str, Any], timing: StreamTiming, arrived: float) -> int | None:
    """Stamp ``timing`` from one event; return the completion tokens if it has the usage."""
    if "error" in event:
        raise RequestFailed(f"error event: {event['error']}")
    for choice in event.get("choices") or []:
        content = (choice.get("delta") or {}).get("content") or choice.get("text")
        if content:
            timing.text_events += 1
            if timing.first is None:
                timing.first = arrived
        if choice.get("finish_reason"):
            timing.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    return int(usage["completion_tokens"]) if usage else None


def _tokens(request: ChatRequest, timing: StreamTiming, usage_tokens: int | None) -> int:
    if usage_tokens is not None:
        return usage_tokens
    if timing.finish_reason == "length":  # no stop strings, end of turn ignored: the cap
        return request.max_tokens
    return timing.text_events  # a lower bound (see the module's note)


async def _timed(
    client: httpx.AsyncClient,
    base_url: str,
    index: int,
    request: ChatRequest,
    include_usage: bool,
    run: HttpRun,
    answered: dict[int, StreamTiming],
) -> None:
    timing = StreamTiming(0.0, request_index=index)
    try:
        await _stream_one(client, base_url, request, timing, include_usage)
    except (RequestFailed, httpx.HTTPError, ValueError) as exc:
        run.failures.append(f"request {index} ({request.model}): {type(exc).__name__}: {exc}")
        return
    answered[index] = timing


def _client(api_key: str | None) -> httpx.AsyncClient:
    # No connection cap: a request queued in the client's pool would be charged time the
    # server never saw.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0, pool=None)
    return httpx.AsyncClient(headers=_headers(api_key), limits=limits, timeout=timeout)


def _finish(run: HttpRun, answered: dict[int, StreamTiming], started: float) -> HttpRun:
    run.seconds = time.perf_counter() - started
    run.timings = [answered[index] for index in sorted(answered)]
    return run


# -- the two drivers -------------------------------------------------------------------------


def closed_loop_http(
    base_url: str,
    requests: Sequence[ChatRequest],
    clients: int,
    api_key: str | None = None,
    include_usage: bool | None = None,
) -> HttpRun:
    """``clients`` callers, each sending its next request when its last one answered.

    ``include_usage`` None asks the server whether it streams usage (the default).
    """
    base_url = base_url.rstrip("/")
    if include_usage is None:
        include_usage = supports_stream_options(base_url, api_key)

    async def drive() -> HttpRun:
        run = HttpRun()
        answered: dict[int, StreamTiming] = {}
        pending = deque(enumerate(requests))
        async with _client(api_key) as client:

            async def caller() -> None:
                while pending:  # one event loop: popping needs no lock
                    index, request = pending.popleft()
                    if not pending:
                        run.saturated_until = time.perf_counter()
                    await _timed(client, base_url, index, request, include_usage, run, answered)

            started = run.started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(clients)))
        return _finish(run, answered, started)

    return asyncio.run(drive())


def open_loop_http(
    base_url: str,
    requests: Sequence[ChatRequest],
    rate: float,
    seed: int,
    api_key: str | None = None,
    include_usage: bool | None = None,
) -> HttpRun:
    """Requests sent at Poisson arrivals of ``rate`` per second, whatever the answers do.

    The gaps come from ``random.Random(seed)`` as in ``workload.open_loop``, so both
    drivers offer the same arrival times for the same seed.
    """
    base_url = base_url.rstrip("/")
    if include_usage is None:
        include_usage = supports_stream_options(base_url, api_key)
    gaps = random.Random(seed)

    async def drive() -> HttpRun:
        run = HttpRun()
        answered: dict[int, StreamTiming] = {}
        tasks = []
        async with _client(api_key) as client:
            started = time.perf_counter()
            due = started
            for index, request in enumerate(requests):
                due += gaps.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(
                    asyncio.create_task(
                        _timed(client, base_url, index, request, include_usage, run, answered)
                    )
                )
            await asyncio.gather(*tasks)
        return _finish(run, answered, started)

    return asyncio.run(drive())


# -- server processes ------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port the kernel just handed out as free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str
) -> None:
    """Poll ``url`` until it answers 200; raise with the log's tail if the process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready at {url} after {timeout_s:.0f} s:\n{_tail(log)}")
        time.sleep(0.25)


def _tail(log: Path, characters: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-characters:]
    return f"(no log at {log})"


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGINT to the process's own session (a clean shutdown), then SIGKILL to what is left.

    The whole session, because servers leave workers behind (vLLM's engine core).
    """
    for signum, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)  # reaped, whichever signal ended it


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    ready_url: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 300,
    what: str = "server",
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in its own session, logging to ``log``; yield once ``ready_url``
    answers 200, and stop the whole session on the way out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **(env or {})},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(ready_url, process, log, startup_timeout_s, what)
        yield process
    finally:
        stop_process(process)


def replica_command(
    base: str | Path,
    port: int,
    adapter_root: Path | None = None,
    serve_args: Sequence[str] = (),
) -> list[str]:
    """``lora-ops serve`` for ``base`` on ``127.0.0.1:port``, loading no registry adapters."""
    command = [sys.executable, "-m", "lora_ops", "serve", "--base", str(base)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-bootstrap"]
    if adapter_root is not None:
        command += ["--adapter-root", str(adapter_root)]
    return command + list(serve_args)


def adapter_root_of(adapters: Mapping[str, Path]) -> Path | None:
    """The deepest folder holding every adapter (None for no adapters)."""
    if not adapters:
        return None
    folders = [str(Path(path).resolve()) for path in adapters.values()]
    common = Path(os.path.commonpath(folders))
    return common.parent if len(folders) == 1 else common


@dataclass
class Replica:
    """A running ``lora-ops serve``: its URL, admin token, process and log."""

    url: str
    admin_token: str
    process: subprocess.Popen[bytes]
    log: Path

    def load_adapter(self, name: str, path: Path, timeout_s: float = 300) -> None:
        """Load the adapter folder ``path`` as model ``name`` (vLLM's admin endpoint)."""
        response = httpx.post(
            f"{self.url}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(Path(path).resolve())},
            headers=_headers(self.admin_token),
            timeout=timeout_s,
        )
        if response.status_code != 200:
            raise RuntimeError(
                f"loading {name} from {path}: {response.status_code} {response.text}"
            )


@contextlib.contextmanager
def lora_ops_replica(
    base: str | Path,
    adapters: Mapping[str, Path] | None = None,
    *,
    adapter_root: Path | None = None,
    serve_args: Sequence[str] = (),
    log: Path | None = None,
    startup_timeout_s: float = 300,
) -> Iterator[Replica]:
    """A ``lora-ops serve`` replica of ``base`` on a free loopback port, every adapter loaded.

    Args:
        base: catalogue name or transformers folder.
        adapters: model name -> adapter folder, loaded through ``/v1/load_lora_adapter``.
        adapter_root: the folder the replica may load adapters from (default: the deepest
            folder holding every adapter).
        serve_args: more ``lora-ops serve`` flags (``--max-batch-size 32``...).
        log: the replica's output (default: a temporary file, removed after a clean stop).
        startup_timeout_s: how long the model may take to load.
    """
    adapters = dict(adapters or {})
    root = adapter_root.resolve() if adapter_root else adapter_root_of(adapters)
    port = free_port()
    own_log = log is None
    if log is None:
        handle, name = tempfile.mkstemp(prefix="lora-ops-replica-", suffix=".log")
        os.close(handle)
        log = Path(name)
    token = secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    env = {"LORA_OPS_ADMIN_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    command = replica_command(base, port, root, serve_args)
    with running_server(
        command, url + "/health", log, env, startup_timeout_s, what="lora-ops replica"
    ) as process:
        replica = Replica(url, token, process, log)
        for name, path in adapters.items():
            replica.load_adapter(name, path)
        yield replica
    if own_log:
        log.unlink(missing_ok=True)
