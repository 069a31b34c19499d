"""A Prefect process worker that stops the way containers and services are stopped.

Prefect's own worker ignores SIGTERM in practice: stopped by Docker, Kubernetes or systemd it
keeps polling its pool until it is killed, and a worker left like that takes new runs with a
stale environment. ``WorkerSupervisor`` runs Prefect's worker as a child and owns the
signals: on SIGTERM or SIGINT it stops the worker taking runs, hands back every flow run the
worker was executing (the run's processes are stopped and the run goes back to ``Scheduled``,
so the next worker takes it; a retrain resumes from its last checkpoint in S3), waits for the
worker to exit, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Scheduled

log = logging.getLogger(__name__)

HANDED_BACK = "Handed back"
FLOW_RUN_VARIABLE = "PREFECT__FLOW_RUN_ID"


@dataclass(frozen=True)
class FlowRunProcess:
    """A process executing one flow run: the worker starts each in a session of its own."""

    pid: int
    flow_run_id: UUID


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _environment(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, _, value in pairs}


def flow_run_processes(worker_pid: int) -> list[FlowRunProcess]:
    """The worker's children that execute a flow run (read from /proc; Linux)."""
    found = []
    for child in _children(worker_pid):
        run_id = _environment(child).get(FLOW_RUN_VARIABLE)
        if run_id:
            try:
                found.append(FlowRunProcess(child, UUID(run_id)))
            except ValueError:
                continue
    return found


def _stop_session(pid: int, grace_s: float) -> None:
    """SIGTERM the flow run's process group, SIGKILL it after ``grace_s``."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def hand_back(flow_run_ids: Sequence[UUID]) -> list[UUID]:
    """Put each unfinished run back to ``Scheduled`` so that another worker takes it.

    Runs that completed, failed or were cancelled meanwhile keep their state: only runs the
    stop interrupted (running, or marked crashed by the worker it was taken from) go back.
    Returns the runs handed back.
    """
    handed = []
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            state = client.read_flow_run(run_id).state
            if state is not None and state.type in {
                StateType.COMPLETED,
                StateType.FAILED,
                StateType.CANCELLED,
                StateType.CANCELLING,
            }:
                continue
            message = "the worker running it was stopped; the next worker takes it"
            client.set_flow_run_state(
                run_id, Scheduled(name=HANDED_BACK, message=message), force=True
            )
            handed.append(run_id)
    return handed


class WorkerSupervisor:
    """Run ``command`` (``prefect worker start ...``) and stop it cleanly on SIGTERM/SIGINT.

    Args:
        command: the Prefect worker's command line.
        env: its environment.
        grace_s: how long each interrupted flow run may take to stop before it is killed.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str], grace_s: float = 20.0):
        self.command = list(command)
        self.env = env
        self.grace_s = grace_s
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Run the worker until it exits or a stop signal is handled; the exit code."""
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._process = subprocess.Popen(self.command, env=self.env)
            while True:
                try:
                    code = self._process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if self._stopping.is_set():
                        return self._stop()
                    continue
                return 0 if self._stopping.is_set() else code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stopping.is_set() and self._process is not None:
            self._process.kill()  # a second signal: stop now
        log.warning("%s received: handing back running flow runs", signal.Signals(signum).name)
        self._stopping.set()

    def _stop(self) -> int:
        assert self._process is not None
        worker = self._process
        # Found before the worker is told to stop: a worker that exits at once (a second
        # SIGINT makes Prefect's kill itself) leaves its flow runs orphaned, out of reach.
        running = {run.flow_run_id: run.pid for run in flow_run_processes(worker.pid)}
        worker.send_signal(signal.SIGINT)  # Prefect's worker: stop taking runs
        stopped: set[UUID] = set()
        deadline = time.monotonic() + self.grace_s + 30
        while True:
            # A run the worker was handing to a process as the signal came shows up a
            # moment later, and is stopped the same way.
            if worker.poll() is None:
                running |= {run.flow_run_id: run.pid for run in flow_run_processes(worker.pid)}
            for run_id, pid in running.items():
                if run_id not in stopped:
                    _stop_session(pid, self.grace_s)
                    stopped.add(run_id)
            if worker.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        interrupted = list(running)
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if interrupted:
            for run_id in hand_back(interrupted):
                log.warning("flow run %s handed back to the pool", run_id)
        log.warning("worker stopped")
        return 0
