"""A quiet rank for ``test_group``: joins the group, writes ``<folder>/ready-<rank>``, then
sums a number with the other ranks ten times a second, printing nothing, until stopped.

    run_group(2, "tests.unit.training.group_rank", [FOLDER])
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from lora_ops.training import distributed
from lora_ops.training.group import WAITER_VARIABLE, end_with_the_waiter


def group_processes(waiter: int) -> list[int]:
    """The pids of the torchrun and ranks that ``run_group`` started in process ``waiter``."""
    marker = f"{WAITER_VARIABLE}={waiter}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


def wait_until_gone(waiter: int, seconds: float) -> None:
    """Wait for every process ``run_group`` started in ``waiter`` to end.

    Raises:
        AssertionError: some are left after ``seconds``; they are killed first, so none
            stays behind on the machine whatever the verdict.
    """
    deadline = time.monotonic() + seconds
    while left := group_processes(waiter):
        if time.monotonic() > deadline:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes {left} outlived the process that waited for them")
        time.sleep(0.2)


def main(folder: Path) -> None:
    end_with_the_waiter()
    with distributed.process_group():
        (folder / f"ready-{distributed.rank()}").touch()
        while True:
            distributed.sum_count(1)
            time.sleep(0.1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
