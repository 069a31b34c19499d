"""A replica converging by itself: on start it loads every customer's production adapter
for its base model from the registry, so a restarted or new replica needs no deploy."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from lora_ops.serving.engine import AdapterSource, Engine

log = logging.getLogger(__name__)

RETRY_S = 30.0


def converge(
    engine: Engine,
    base_model: str,
    on_ready: Callable[[], None],
    stop: threading.Event | None = None,
    retry_s: float = RETRY_S,
) -> list[str]:
    """Load the production adapters, calling ``on_ready`` once the replica may take traffic.

    With the registry reachable, that is after the adapters are loaded. With it unreachable,
    the replica says so in one line and is ready at once, serving its base model and the
    adapters loaded through the API; it asks the registry again every ``retry_s`` seconds
    and loads the production adapters when it answers. Returns the customers loaded (empty
    when ``stop`` was set first).
    """
    from lora_ops.registry import Registry, RegistryUnavailable

    stop = stop or threading.Event()
    registry = Registry()
    warned = False
    while not stop.is_set():
        try:
            registry.check_reachable()
            loaded = load_production_adapters(engine, base_model)
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


def load_production_adapters(engine: Engine, base_model: str) -> list[str]:
    """Load each production adapter made for ``base_model``; returns the customers loaded.

    An adapter that fails to load is logged and skipped: one bad version must not keep
    the replica from serving everyone else.
    """
    from lora_ops.fleet.smoke import ADAPTER_SHA256_TAG
    from lora_ops.registry import Registry

    loaded = []
    for customer, version in Registry().production_versions(base_model):
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
