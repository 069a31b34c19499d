"""``lora-ops gateway``: one OpenAI-compatible URL for the whole serving fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_ops.cli.common import secret_value
from lora_ops.fleet.placement import DEFAULT_LOAD_FACTOR


def gateway(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            help='JSON file {"<key>": {"customer": ID, "allow_base": bool}}: a key reaches '
            "only its customer. Without: the admin token only (LORA_OPS_ADMIN_TOKEN), or "
            "anyone when there is none."
        ),
    ] = None,
    copies: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Replicas each customer's adapter is placed on (k); default "
            "LORA_OPS_FLEET_COPIES (2). Deploys place by that setting too: keep them equal.",
            show_default=False,
        ),
    ] = None,
    load_factor: Annotated[
        float,
        typer.Option(min=1.0, help="A replica holds at most this times the mean of copies."),
    ] = DEFAULT_LOAD_FACTOR,
    hot_requests_per_s: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="A customer above this many requests/s gets a replica more per multiple "
            "of it (default: no extra copies).",
            show_default=False,
        ),
    ] = None,
    control: Annotated[
        bool,
        typer.Option(
            help="Keep the fleet: health checks, draining, re-placement, hot copies "
            "(gateways share the work through a lease in the database)."
        ),
    ] = True,
    health_interval_s: Annotated[
        float, typer.Option(min=0.1, help="Seconds between health checks of the replicas.")
    ] = 2.0,
    refresh_s: Annotated[
        float, typer.Option(min=0.1, help="Seconds between reads of the fleet's placement.")
    ] = 2.0,
    timeout_s: Annotated[
        float, typer.Option(min=1.0, help="Longest wait for a replica's next byte.")
    ] = 120.0,
    cooldown_s: Annotated[
        float, typer.Option(min=0.0, help="Seconds a replica that failed gets no requests.")
    ] = 10.0,
) -> None:
    """Serve the fleet's OpenAI API on one URL, routed by placement, with failover."""
    import uvicorn

    from lora_ops.db import Database
    from lora_ops.fleet.controller import ControllerConfig
    from lora_ops.gateway.fleet_gateway import FleetGateway, GatewayConfig
    from lora_ops.serving.access import load_api_keys
    from lora_ops.settings import get_settings

    grants = load_api_keys(api_keys) if api_keys else None
    settings = get_settings()
    control_config = ControllerConfig(
        copies=copies or settings.fleet_copies,
        load_factor=load_factor,
        interval_s=health_interval_s,
        hot_requests_per_s=hot_requests_per_s,
    )
    config = GatewayConfig(timeout_s, refresh_s, cooldown_s, control_config if control else None)
    token = secret_value(settings.admin_token)
    service = FleetGateway(Database.from_settings(), token, grants, config)
    uvicorn.run(service.app, host=host, port=port, log_level="warning")
