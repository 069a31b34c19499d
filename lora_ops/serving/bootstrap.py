"""A replica converging by itself: on start it loads every customer's production adapter
for its base model from the registry, so a restarted or new replica needs no deploy."""

from __future__ import annotations

import logging

from lora_ops.serving.engine import AdapterSource, Engine

log = logging.getLogger(__name__)


def load_production_adapters(engine: Engine, base_model: str) -> list[str]:
    """Load each production adapter made for ``base_model``; returns the customers loaded.

    An adapter that fails to load is logged and skipped: one bad version must not keep
    the replica from serving everyone else.
    """
    from lora_ops.registry import Registry
    from lora_ops.smoke import ADAPTER_SHA256_TAG

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
