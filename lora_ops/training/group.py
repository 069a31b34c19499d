"""A data-parallel process group started from a running process: ``torchrun --standalone``
as a child, its output passed on line by line to this process's log, its failure raised.

The pipeline's train step uses it to train on N devices while it keeps talking to the
orchestrator: the ranks' output becomes log records here, so a Prefect run's log shows
their progress as it would show an in-process run's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lora_ops.errors import LoraOpsError

log = logging.getLogger(__name__)

TAIL_LINES = 30
# After SIGTERM torchrun stops its ranks and exits; a group that ignores it is killed.
_STOP_SECONDS = 30
# The pid of the process waiting for the group, which each rank outlives by a second at most.
WAITER_VARIABLE = "LORA_OPS_TRAINING_GROUP_WAITER"
_WATCH_SECONDS = 1.0
_PROC = Path("/proc")


class TrainingGroupFailed(LoraOpsError):
    """The training processes exited with an error; the message holds their last lines."""


def torchrun_command(processes: int, module: str, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m MODULE ARGS`` on this interpreter, so
    the ranks get this environment's torch and lora-ops whatever ``torchrun`` is on PATH."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(processes), "-m", module, *args,
    ]  # fmt: skip


def check_devices(processes: int) -> None:
    """Refuse more ranks than GPUs: each rank takes ``cuda:LOCAL_RANK`` for itself.

    Raises:
        LoraOpsError: CUDA is there with fewer devices than ``processes``.
    """
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise LoraOpsError(
            f"{processes} training processes need {processes} GPUs, one each; this machine "
            f"has {torch.cuda.device_count()} (LORA_OPS_TRAINING_PROCESSES)"
        )


def run_group(
    processes: int,
    module: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``python -m MODULE ARGS`` in ``processes`` ranks and wait for all of them.

    Every line the ranks print is logged here at INFO as it comes. The ranks inherit this
    process's environment with ``env`` over it. A rank that calls ``end_with_the_waiter``
    exits once this process is gone, however it ended (a cancelled run, a killed worker).

    Raises:
        TrainingGroupFailed: the group exited with an error; names the exit code and holds
            the last lines the ranks and torchrun printed.
    """
    check_devices(processes)
    child_env = {
        **os.environ,
        **(env or {}),
        "PYTHONUNBUFFERED": "1",
        WAITER_VARIABLE: str(os.getpid()),
    }
    # Unset, torchrun gives each rank one thread (and warns): the cores are shared out.
    threads = max(1, (os.cpu_count() or 1) // processes)
    child_env.setdefault("OMP_NUM_THREADS", str(threads))
    command = torchrun_command(processes, module, args)
    log.info("training in %d processes: %s", processes, " ".join(command[1:]))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env,
        text=True,
        errors="replace",
    ) as group:
        try:
            _pass_on(group, tail)
            code = group.wait()
        except BaseException:
            _stop(group)
            raise
    if code != 0:
        lines = "\n".join(tail)
        raise TrainingGroupFailed(
            f"the {processes} training processes failed (torchrun exit code {code}); "
            f"their last lines:\n{lines}"
        )


def _pass_on(group: subprocess.Popen[str], tail: deque[str]) -> None:
    """Log each line of the group's output until it closes; keep the last ones."""
    assert group.stdout is not None  # a pipe was asked for
    # Text mode reads "\r" as a line end too: a progress bar's redraws arrive as lines.
    for raw in group.stdout:
        line = raw.rstrip()
        if line:
            tail.append(line)
            log.info("%s", line)


def _stop(group: subprocess.Popen[str]) -> None:
    """Stop a group this process no longer waits for (it was interrupted)."""
    if group.poll() is not None:
        return
    group.terminate()  # torchrun passes it on to the ranks
    try:
        group.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        group.kill()
        group.wait()


def end_with_the_waiter() -> None:
    """In a rank: exit as soon as the process waiting for the group, or torchrun, is gone.

    torchrun starts each rank in a session of its own, so killing the waiting process's
    process group (as a worker that stops a flow run does) would leave the ranks training
    on, still reporting to the MLflow run and uploading checkpoints while a retry resumes
    it. Outside ``run_group``'s ranks this does nothing.
    """
    waiter = os.environ.get(WAITER_VARIABLE)
    if waiter is None:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher and _alive(int(waiter)):
            time.sleep(_WATCH_SECONDS)
        log.error("the process that started this training group is gone: stopping")
        os._exit(1)  # mid-collective, no cleanup could finish anyway

    threading.Thread(target=watch, name="watch-waiter", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a killed process its parent has not reaped yet does not."""
    if not _PROC.is_dir():  # no procfs (macOS): whether the kernel still knows the pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in {"Z", "X"}  # a zombie is dead, only not yet reaped
