"""Kept for imports from here: the helpers live in tests/processes.py."""

from tests.processes import LoraOpsProcess, ReplicaProcess, WorkerProcess  # noqa: F401
