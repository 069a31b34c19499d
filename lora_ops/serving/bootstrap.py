"""A replica converging by itself: on start it loads the production adapters it should
serve from the registry, so a restarted or new replica needs no deploy.

A replica on its own serves every customer of its base. A fleet member (started with the
URL the fleet knows it by) serves the customers placed on it in the service database, and
no others: placement, not one replica's memory, bounds how many customers the fleet holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

from lora_ops.serving.engine import AdapterSource, Engine

log = logging.getLogger(__name__)

RETRY_S = 30.0


def converge(
    engine: Engine,
    base_model: str,
    on_ready: Callable[[], None],
    stop: threading.Event | None = None,
    retry_s: float = RETRY_S,
    fleet_url: str | None = None,
) -> list[str]:
    """Load the production adapters, calling ``on_ready`` once the replica may take traffic.

    With the registry reachable, that is after the adapters are loaded. With it unreachable,
    the replica says so in one line and is ready at once, serving its base model and the
    adapters loaded through the API; it asks the registry again every ``retry_s`` seconds
    and loads the production adapters when it answers. With ``fleet_url``, only the
    customers placed on that URL are loaded. Returns the customers loaded (empty when
    ``stop`` was set first).
    """
    from lora_ops.registry import Registry, RegistryUnavailable

    stop = stop or threading.Event()
    registry = Registry()
    warned = False
    while not stop.is_set():
        try:
            registry.check_reachable()
            only = None if fleet_url is None else placed_on(fleet_url)
            loaded = load_production_adapters(engine, base_model, only)
        except RegistryUnavailable as exc:
            if not warned:
                log.warning(
                    "%s: serving the base model and adapters loaded through the API; "
                    "asking again every %.0f s",
                    exc,
                    retry_s,
                )
                warned = True
                on_ready()
            stop.wait(retry_s)
            continue
        except Exception:
            log.exception("the registry could not be read at start-up")
            loaded = []
        on_ready()
        return loaded
    return []


def placed_on(url: str) -> set[str]:
    """The customers the service database places on the replica at ``url``."""
    from lora_ops.db import Database

    return {c for c, urls in Database.from_settings().placements().items() if url in urls}


def load_production_adapters(
    engine: Engine, base_model: str, only: Collection[str] | None = None
) -> list[str]:
    """Load each production adapter made for ``base_model`` (of the customers in ``only``,
    when given); returns the customers loaded.

    An adapter that fails to load is logged and skipped: one bad version must not keep
    the replica from serving everyone else.
    """
    from lora_ops.registry import Registry
    from lora_ops.registry.tags import ADAPTER_SHA256_TAG

    loaded = []
    for customer, version in Registry().production_versions(base_model):
        if only is not None and customer not in only:
            continue
        source = AdapterSource(
            f"models:/adapter-{customer}/{version.version}", version.tags.get(ADAPTER_SHA256_TAG)
        )
        try:
            engine.load_adapter(customer, source)
        except Exception:
            log.exception(
                "could not load %s's production adapter (version %s)", customer, version.version
            )
            continue
        loaded.append(customer)
    log.info("loaded production adapters: %s", ", ".join(loaded) or "none")
    return loaded
