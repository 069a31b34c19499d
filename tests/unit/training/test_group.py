"""The pipeline's training process group, as the waiting process sees it: the ranks' lines
in its log as they come, and a failed group raised with its exit code and last lines."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_ops.training.group import TrainingGroupFailed, run_group
from tests.unit.training.group_rank import group_processes, wait_until_gone

ROOT = Path(__file__).parents[3]


def test_a_failed_group_names_its_exit_code_and_last_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "attempt.json"
    with (
        caplog.at_level(logging.INFO, logger="lora_ops.training.group"),
        pytest.raises(TrainingGroupFailed) as failed,
    ):
        run_group(2, "lora_ops.training.attempt", [str(missing)])
    message = str(failed.value)
    assert message.startswith("the 2 training processes failed (torchrun exit code 1)")
    # Each rank's own error, not only torchrun's summary of it.
    assert f"No such file or directory: '{missing}'" in message
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("FileNotFoundError") for line in logged), logged


WAITER = """
import sys
from lora_ops.training.group import run_group
run_group(2, "tests.unit.training.group_rank", [sys.argv[1]])
"""


def test_the_ranks_end_with_the_process_that_waits_for_them(tmp_path: Path) -> None:
    """Killed with its process group (as a worker stops a flow run), the waiting process
    takes torchrun along, and the ranks, in sessions of their own, follow within seconds
    instead of training on and reporting to a run that a retry resumes."""
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
            assert waiter.poll() is None, "the group ended before both ranks joined"
            assert time.monotonic() < deadline, "the ranks never joined"
            time.sleep(0.1)
        assert len(group_processes(waiter.pid)) == 3  # torchrun and the two ranks
    finally:
        os.killpg(waiter.pid, signal.SIGKILL)
        waiter.wait(timeout=30)
    wait_until_gone(waiter.pid, seconds=15)
