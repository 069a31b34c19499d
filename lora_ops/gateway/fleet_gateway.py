"""The fleet's gateway as ``lora-ops gateway`` runs it: routing by the database's placement,
and the controller that keeps that placement true.

:class:`FleetGateway` puts together what the rest of the package keeps apart: a
:class:`~lora_ops.gateway.placement_router.PlacementRouter` refreshing from the service
database, the app :func:`~lora_ops.gateway.app.create_gateway` builds around it, and a
:class:`~lora_ops.fleet.controller.FleetController` on its own thread fed by the app's
traffic counts. Each background thread starts and stops with the app's lifespan, so a test
client or uvicorn runs the whole of it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from lora_ops.db import Database
from lora_ops.fleet.client import Fleet
from lora_ops.fleet.controller import ControllerConfig, FleetController
from lora_ops.gateway.app import create_gateway
from lora_ops.gateway.load import Load
from lora_ops.gateway.placement_router import PlacementRouter
from lora_ops.gateway.traffic import Traffic
from lora_ops.registry import Registry
from lora_ops.serving.access import KeyGrant


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway routes; ``control`` None runs it without a fleet controller (another
    gateway's keeps the fleet)."""

    timeout_s: float = 120.0
    refresh_s: float = 2.0
    cooldown_s: float = 10.0
    control: ControllerConfig | None = ControllerConfig()


class FleetGateway:
    """One gateway process: the app to serve, with its router and controller threads."""

    def __init__(
        self,
        db: Database,
        admin_token: str | None,
        api_keys: dict[str, KeyGrant] | None,
        config: GatewayConfig | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.config = config or GatewayConfig()
        load = Load()
        self.traffic = Traffic()
        self.router = PlacementRouter(db, self.config.refresh_s, self.config.cooldown_s, load)
        self.controller: FleetController | None = None
        if self.config.control is not None:
            # A controller's loads run while it holds the lease: a replica that hangs must
            # not hold it for the gateway's whole request timeout.
            fleet = Fleet(db, admin_token, timeout_s=60.0)
            self.controller = FleetController(
                fleet, registry or Registry(), self.config.control, self.traffic.take
            )
        self.app = create_gateway(
            self.router,
            admin_token,
            api_keys,
            self.config.timeout_s,
            load=load,
            traffic=self.traffic,
        )
        inner = self.app.router.lifespan_context
        self.app.router.lifespan_context = self._lifespan(inner)
        self._stop = threading.Event()
        self._controller_thread: threading.Thread | None = None

    def _lifespan(self, inner: Any) -> Any:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with inner(app):
                self.start()
                try:
                    yield
                finally:
                    self.stop()

        return lifespan

    def start(self) -> None:
        """Refresh the routes and run the controller in the background."""
        self._stop.clear()
        self.router.start()
        if self.controller is not None and self._controller_thread is None:
            self._controller_thread = threading.Thread(
                target=self.controller.run, args=(self._stop,), name="fleet-controller", daemon=True
            )
            self._controller_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.router.stop()
        if self._controller_thread is not None:
            self._controller_thread.join(timeout=30)
            self._controller_thread = None
