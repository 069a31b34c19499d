"""Requests per model since the last look: what a controller reads to find hot customers.

The gateway records on its event loop; a controller takes the counts from its own thread,
so both go through a lock. Counts are by exact model name, unlike the metrics' bounded
buckets: they live only until the next take, so thousands of customers cost a dict that
size at most.
"""

from __future__ import annotations

import threading
from collections import Counter


class Traffic:
    """Per-model request counts; :meth:`take` hands them over and starts again from zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def record(self, model: str) -> None:
        """One request for ``model``."""
        with self._lock:
            self._counts[model] += 1

    def take(self) -> dict[str, int]:
        """The counts recorded since the last take (models with none are absent); the
        next take counts from now."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return dict(counts)
