"""Which replicas may answer a model: the :class:`Router` interface and a static router.

The gateway asks a router for candidates, best first, and tells it how each attempt went;
it never decides order itself. A router that knows placement (which replicas hold which
customer's adapter) implements the same three methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from lora_ops.gateway.load import Load

log = logging.getLogger(__name__)
ANY_MODEL = "*"  # a placement key: the replicas for every model not listed by name
# A few requests more in flight cost a replica little (they join its running batch); an
# adapter that is not resident costs a load.
DEFAULT_SPILL_MARGIN = 2


class Router(Protocol):
    """Where the gateway sends a model's requests, and what it learns from the answers."""

    def candidates(self, model: str) -> list[str]:
        """Replica base URLs that may serve ``model``, best first; [] when none can."""
        ...

    def report(self, url: str, ok: bool, reason: str = "") -> None:
        """An attempt's outcome: ``ok`` False when the replica failed (unreachable, timed
        out, a 5xx, a stream broken mid-way), so it can be taken out of rotation."""
        ...

    def models(self) -> list[str]:
        """Every model name the fleet serves: base models and customers."""
        ...


class StaticRouter:
    """A fixed placement (model -> replica URLs), minus replicas cooling down after a failure.

    A failure reported for a replica takes it out of rotation for ``cooldown_s``; it comes
    back by itself once that has passed. A success does not end a cooldown early: it comes
    from a request sent before the failure, so it says less about the replica now.

    Args:
        placement: model -> replica base URLs, in order of preference; the key
            :data:`ANY_MODEL` gives the replicas of every model not listed.
        cooldown_s: how long a failed replica gets no requests.
        load: in-flight counts; given, a replica with more than ``spill_margin`` requests
            in flight above the least busy candidate goes after the others.
        spill_margin: how much busier than the least busy copy a replica may be and still
            go first; 0 puts the least busy first, which spreads every customer over all
            its copies, so each replica's adapter cache holds k times the customers.
        clock: seconds, monotonic; tests pass their own.
    """

    def __init__(
        self,
        placement: Mapping[str, Sequence[str]],
        cooldown_s: float = 10.0,
        load: Load | None = None,
        clock: Callable[[], float] = time.monotonic,
        spill_margin: int = DEFAULT_SPILL_MARGIN,
    ) -> None:
        self.spill_margin = spill_margin
        self.placement = {
            model: [url.rstrip("/") for url in urls] for model, urls in placement.items()
        }
        self.cooldown_s = cooldown_s
        self.load = load
        self.clock = clock
        self._out_until: dict[str, float] = {}

    def candidates(self, model: str) -> list[str]:
        urls = self.placement.get(model, self.placement.get(ANY_MODEL, []))
        ready = [url for url in urls if self.in_rotation(url)]
        if self.load is not None and len(ready) > 1:
            # Placement order is cache affinity: a customer's traffic kept on its first
            # replica keeps its adapter resident there. A replica busier than the least
            # busy by more than the margin goes to the back (sort is stable).
            inflight = {url: self.load.inflight(url) for url in ready}
            least = min(inflight.values())
            ready.sort(key=lambda url: inflight[url] > least + self.spill_margin)
        return ready

    def report(self, url: str, ok: bool, reason: str = "") -> None:
        if ok:
            return
        self._out_until[url] = self.clock() + self.cooldown_s
        log.warning("replica %s out of rotation for %.0f s: %s", url, self.cooldown_s, reason)

    def models(self) -> list[str]:
        return [model for model in self.placement if model != ANY_MODEL]

    def in_rotation(self, url: str) -> bool:
        return self._out_until.get(url, float("-inf")) <= self.clock()
