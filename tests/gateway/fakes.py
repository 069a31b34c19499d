"""Stand-ins for replicas that misbehave on cue, and a gateway served on a real port.

A :class:`FakeReplica` is a raw socket server: each connection is answered by a script
and then closed, so a test says exactly what the gateway sees (a refused connection, a
5xx, one event and a dropped connection) without racing a real process.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lora_ops.gateway import StaticRouter
from tests.servers import free_port


@dataclass(frozen=True)
class Received:
    head: str  # request line and headers
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Script = Callable[[socket.socket, Received], None]


class FakeReplica:
    """A loopback HTTP server answering every connection with ``script``, then closing it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeReplica:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._listener.close()
        self._thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            self.received.append(request)
            self.script(conn, request)


def _read_request(conn: socket.socket) -> Received:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    received = Received(head.decode(), b"")
    length = int(received.header("content-length") or 0)
    while len(body) < length:
        body += conn.recv(65536)
    return Received(head.decode(), body)


# -- scripts ---------------------------------------------------------------------------------


def drop(conn: socket.socket, _: Received) -> None:
    """Close without a word: the connection ends before any response."""


def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Script:
    """One whole JSON response."""
    payload = json.dumps(body).encode()

    def script(conn: socket.socket, _: Received) -> None:
        lines = [f"HTTP/1.1 {status} X", "content-type: application/json", "connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        lines.append(f"content-length: {len(payload)}")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    return script


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_STREAM_HEAD = (
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    "transfer-encoding: chunked\r\nconnection: close\r\n"
)


def stream(
    events: list[bytes],
    go: threading.Event | None = None,
    end: bool = True,
    headers: dict[str, str] | None = None,
) -> Script:
    """Events as a chunked event stream, after ``headers`` too. With ``go``, the first event
    goes out at once and the rest once ``go`` is set; with ``end`` False the connection
    drops instead of ending."""
    head = _STREAM_HEAD + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())

    def script(conn: socket.socket, _: Received) -> None:
        conn.sendall((head + "\r\n").encode())
        for index, event in enumerate(events):
            if index == 1 and go is not None:
                assert go.wait(timeout=120), "the test never let the stream go on"
            conn.sendall(_chunk(event))
        if end:
            conn.sendall(b"0\r\n\r\n")

    return script


def completion_event(text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": "acme",
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


DONE = b"data: [DONE]\n\n"

# -- a gateway on a real port ----------------------------------------------------------------


@contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the gateway's server stopped before it started"
        assert time.monotonic() < deadline, "the gateway's server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- what the gateway did ---------------------------------------------------------------------


class SpyRouter(StaticRouter):
    """A static router that remembers every outcome reported to it; failures cool a
    replica down for an hour, so no test waits on a cooldown's end."""

    def __init__(self, placement: dict[str, list[str]]) -> None:
        super().__init__(placement, cooldown_s=3600)
        self.reports: list[tuple[str, bool, str]] = []

    def report(self, url: str, ok: bool, reason: str = "") -> None:
        self.reports.append((url, ok, reason))
        super().report(url, ok, reason)

    def failures(self) -> list[str]:
        return [url for url, ok, _ in self.reports if not ok]


def sample(metrics: str, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics text; 0 when the labels were never seen."""
    for family in text_string_to_metric_families(metrics):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return 0.0
