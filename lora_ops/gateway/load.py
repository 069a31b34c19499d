"""Requests in flight, per replica: the gateway counts them, a router reads them to order.

The gateway runs on one event loop, so the counts need no lock; a router reading them from
another thread sees a count that is at most one request old, which ordering can live with.
"""

from __future__ import annotations


class Load:
    """In-flight requests per replica URL. Hand the same object to the router and the gateway."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def inflight(self, url: str) -> int:
        """Requests sent to ``url`` whose answer has not fully come back yet."""
        return self._inflight.get(url, 0)

    def snapshot(self) -> dict[str, int]:
        """Every replica that has had a request, with its count now."""
        return dict(self._inflight)

    def begin(self, url: str) -> None:
        self._inflight[url] = self._inflight.get(url, 0) + 1

    def end(self, url: str) -> None:
        self._inflight[url] = max(0, self._inflight.get(url, 0) - 1)
