"""Real `lora-ops serve` processes on loopback, and adapters for them, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from lora_ops import base_models
from lora_ops.lora import LoraSpec, apply_lora, save_adapter
from tests.helpers import randomize_adapter
from tests.servers import free_port

TOKEN = "replica-admin-token-for-tests"


def make_adapters(base: Path, root: Path, customers: list[str], r: int = 4) -> dict[str, Path]:
    """One PEFT-format adapter per customer under ``root``, B randomised so each differs."""
    out = {}
    for seed, name in enumerate(customers):
        model = base_models.load_model(base, "cpu")
        apply_lora(model, LoraSpec(r=r, alpha=2 * r), adapter=name)
        randomize_adapter(model, name, seed=seed, std=0.3)
        out[name] = save_adapter(
            model, root / name, adapter=name, base_model_name_or_path="tiny-llama"
        )
    return out


class Replica:
    """``lora-ops serve --base BASE ARGS`` on a free port, stopped on exit.

    Args:
        base: the base model folder.
        log: where the process writes its output (shown when it fails to start).
        args: more ``serve`` options.
        env: more environment variables.
        bootstrap: load the production adapters from the registry at start.
    """

    def __init__(
        self,
        base: Path,
        log: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        bootstrap: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [
            *(sys.executable, "-c", "from lora_ops.cli import main; main()", "serve"),
            *("--base", str(base), "--port", str(self.port)),
            *([] if bootstrap else ["--no-bootstrap"]),
            *args,
        ]
        self.env = {**os.environ, "LORA_OPS_ADMIN_TOKEN": TOKEN, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Replica:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 180  # two cores may be busy with other tests
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "replica did not start"
            time.sleep(0.2)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def post(self, path: str, body: dict[str, object], token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120)

    def load(self, name: str, path: Path | str, sha256: str | None = None) -> httpx.Response:
        body: dict[str, object] = {"lora_name": name, "lora_path": str(path)}
        if sha256 is not None:
            body["sha256"] = sha256
        return self.post("/v1/load_lora_adapter", body)

    def complete(self, model: str, key: str | None = None, max_tokens: int = 4) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}
        return httpx.post(self.url + "/v1/completions", json=body, headers=headers, timeout=120)

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")
