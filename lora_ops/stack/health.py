"""Loopback checks of a part: does it answer its health endpoint, is its port free.

The one module of the stack that speaks HTTP, always straight to 127.0.0.1, never through
a proxy the caller's environment names.
"""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

from lora_ops.stack.parts import HEALTH_PATHS, PORT_VARIABLES, StackError


def wait_healthy(
    name: str, url: str, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    """Poll the health endpoint until it answers; False on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2.0) as client:  # loopback: never a proxy
        while not _answers(client, name, url):
            if process is not None and process.poll() is not None:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)
    return True


def healthy(name: str, url: str) -> bool:
    """Whether the part called ``name`` at ``url`` answers its health check now."""
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        return _answers(client, name, url)


def check_port_free(name: str, port: int) -> None:
    """Refuse a port another program holds, naming the variable that moves the part.

    Raises:
        StackError: ``port`` cannot be bound on 127.0.0.1.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for {name} is in use by another program; stop it or set "
                f"{PORT_VARIABLES[name]} to a free port"
            ) from None


def _answers(client: httpx.Client, name: str, url: str) -> bool:
    try:
        response = client.get(url + HEALTH_PATHS[name])
    except httpx.HTTPError:
        return False
    # rclone answers an unsigned GET / with 403: it is up and enforcing auth.
    return response.status_code < 500 if name == "s3" else response.status_code == 200
