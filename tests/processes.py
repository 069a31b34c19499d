"""lora-ops processes the integration tests start: serving replicas and Prefect workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout_s} s"
        time.sleep(0.2)


class LoraOpsProcess:
    """``python -m lora_ops ARGS`` in its own session, logging to ``log``."""

    def __init__(self, args: list[str], health_url: str, log: Path, env: dict[str, str]) -> None:
        self.args = args
        self.health_url = health_url
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_ops", *self.args],
            env={**os.environ, **self.env},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its children (flow runs) are stopped with it
        )
        wait_healthy(self.health_url, self.process, self.log, timeout_s)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 20) -> None:
        """Signal the whole session (SIGINT lets a Prefect worker stop cleanly), then kill."""
        if self.process is None or self.process.poll() is not None:
            return
        for signum, wait_s in ((sig, timeout_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        self.stop(signal.SIGKILL, 10)


class ReplicaProcess(LoraOpsProcess):
    """A serving replica of ``base`` (tiny-llama) on ``port``; ``extra_args`` go to
    ``lora-ops serve``."""

    def __init__(
        self,
        port: int,
        log: Path,
        token: str,
        extra_args: list[str] | None = None,
        base: str = "tiny-llama",
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        args = ["serve", "--base", base, "--port", str(port), *(extra_args or [])]
        super().__init__(args, self.url + "/health", log, {"LORA_OPS_ADMIN_TOKEN": token})


class GatewayProcess(LoraOpsProcess):
    """``lora-ops gateway`` on ``port``; ``extra_args`` go to the command."""

    def __init__(
        self, port: int, log: Path, token: str, extra_args: list[str] | None = None
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        args = ["gateway", "--port", str(port), *(extra_args or [])]
        super().__init__(args, self.url + "/health", log, {"LORA_OPS_ADMIN_TOKEN": token})


class WorkerProcess(LoraOpsProcess):
    """``lora-ops worker`` on ``pool``, its health endpoint on ``port``."""

    def __init__(self, pool: str, port: int, log: Path, env: dict[str, str]) -> None:
        self.pool = pool
        args = ["worker", "--pool", pool, "--healthcheck-port", str(port)]
        super().__init__(args, f"http://127.0.0.1:{port}/health", log, env)
