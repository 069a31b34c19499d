"""Routing by the fleet's recorded placement: a customer's requests go to its replicas.

The service database says which replicas hold each customer's production adapter
(:mod:`lora_ops.fleet.placer` records it only once those replicas have loaded it and
answered the smoke prompt) and which replicas are in rotation. This router reads both every
``refresh_s`` seconds on its own thread, so a request never waits on the database: routing
reads the last snapshot, and any number of gateways reading one database agree.

The base model is named as the fleet's replicas declare it (``tiny-llama``...); ``base``
also names it while the fleet serves one base only, as a lone replica does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lora_ops.db import ACTIVE, Database
from lora_ops.gateway.load import Load
from lora_ops.gateway.routing import DEFAULT_SPILL_MARGIN, StaticRouter

log = logging.getLogger(__name__)
BASE_MODEL_NAME = "base"


class PlacementRouter(StaticRouter):
    """:class:`StaticRouter` over the database's placement, refreshed in the background."""

    def __init__(
        self,
        db: Database,
        refresh_s: float = 2.0,
        cooldown_s: float = 10.0,
        load: Load | None = None,
        clock: Callable[[], float] = time.monotonic,
        spill_margin: int = DEFAULT_SPILL_MARGIN,
    ) -> None:
        super().__init__({}, cooldown_s, load, clock, spill_margin)
        self.db = db
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read placement and replicas now; a failed read keeps the last snapshot."""
        try:
            replicas = [r for r in self.db.replicas() if r.state == ACTIVE and r.base]
            placements = self.db.placements()
        except Exception:
            log.exception("could not read the fleet's placement; routing by the last one read")
            return
        active = {r.url for r in replicas}
        routes: dict[str, list[str]] = {}
        for replica in replicas:
            routes.setdefault(str(replica.base), []).append(replica.url)
        if len(routes) == 1:
            routes[BASE_MODEL_NAME] = next(iter(routes.values()))
        for customer, urls in placements.items():
            routes[customer] = [url for url in urls if url in active]
        self.placement = routes  # one assignment: readers see the old table or the new

    def start(self) -> None:
        """Refresh every ``refresh_s`` seconds until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()
