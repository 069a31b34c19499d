"""The gateway's HTTP face: ``create_gateway`` builds one FastAPI app for a whole fleet.

Callers see a replica's API (:mod:`~lora_ops.gateway.routes`); each request goes to a
replica the router picks (:mod:`~lora_ops.gateway.proxy`), over one shared HTTP client with
the fleet's admin token, so replicas can sit on a private network. The gateway keeps no
state beyond the router and its in-memory counters, so any number of them can run side by
side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lora_ops.gateway.errors import add_error_handlers
from lora_ops.gateway.load import Load
from lora_ops.gateway.metrics import gateway_metrics
from lora_ops.gateway.proxy import Proxy
from lora_ops.gateway.routes import GatewayState, gateway_of, routes
from lora_ops.gateway.routing import Router
from lora_ops.gateway.timing import OverheadClock
from lora_ops.gateway.traffic import Traffic
from lora_ops.serving.access import Access, KeyGrant
from lora_ops.serving.limits import BodyLimit


def create_gateway(
    router: Router,
    admin_token: str | None,
    api_keys: dict[str, KeyGrant] | None,
    timeout_s: float = 120.0,
    *,
    load: Load | None = None,
    traffic: Traffic | None = None,
) -> FastAPI:
    """A FastAPI app forwarding OpenAI's API to the replicas ``router`` chooses.

    Args:
        router: chooses replicas per model and hears how each attempt went.
        admin_token: the fleet's admin token: sent to every replica, and accepted from a
            caller as reaching every model.
        api_keys: sha256(key) -> grant (:func:`lora_ops.serving.access.load_api_keys`); with
            keys, a key reaches only its customer's model (and ``base`` when allowed). None:
            the gateway is open.
        timeout_s: the longest wait for a replica's next byte before it counts as failed;
            an unstreamed answer comes in one piece, so this bounds its whole generation.
        load: in-flight counts to share with the router; a fresh one when None.
        traffic: requests per model, for whoever decides how many replicas a customer
            gets (``gateway_of(app).traffic``); a fresh one when None.

    The shared HTTP client is opened by the app's lifespan: serve it with uvicorn, or test
    it inside ``with TestClient(app)``.
    """
    load = load or Load()
    traffic = traffic or Traffic()
    metrics = gateway_metrics(load)
    proxy = Proxy(router, load, metrics, admin_token, timeout_s, traffic)
    app = FastAPI(title="lora-ops gateway", version="1", lifespan=_lifespan)
    app.include_router(routes)
    access = Access(admin_token, api_keys)
    app.state.gateway = GatewayState(router, access, load, metrics, proxy, traffic)
    app.add_middleware(BodyLimit)
    app.add_middleware(OverheadClock, histogram=metrics.overhead)  # outermost: clock starts first
    add_error_handlers(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with gateway_of(app).proxy.open():
        yield
