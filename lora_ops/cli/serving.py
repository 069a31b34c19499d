"""Serving: run a replica, manage the fleet, deploy and roll back adapters."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from lora_ops.cli.common import BaseOption, out, secret_value
from lora_ops.defaults import DEFAULT_BASE
from lora_ops.errors import InputError

fleet_app = typer.Typer(help="The serving replicas deploys go to.", no_args_is_help=True)


def serve(
    base: BaseOption = DEFAULT_BASE,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    admin_token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token for load/unload (default: LORA_OPS_ADMIN_TOKEN).", show_default=False
        ),
    ] = None,
    max_adapters: Annotated[int, typer.Option(min=1, help="Adapters kept in memory.")] = 1024,
    max_adapter_mb: Annotated[
        int, typer.Option(min=1, help="Memory for the adapters kept in memory, MiB.")
    ] = 2048,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests running at once.")] = 16,
    max_queue: Annotated[
        int,
        typer.Option(min=1, help="Requests allowed to wait to run; more get 429 at once."),
    ] = 256,
    max_requests_per_model: Annotated[
        int,
        typer.Option(
            min=1, help="Requests one customer may have waiting and running; more get 429."
        ),
    ] = 128,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(
            min=16,
            help="Tokens the KV cache holds for the running requests "
            "(default: the larger of the context length and 1,024 per batch row).",
            show_default=False,
        ),
    ] = None,
    prefill_chunk_tokens: Annotated[
        int, typer.Option(min=1, help="Most prompt tokens computed per step.")
    ] = 512,
    prefix_caching: Annotated[
        bool, typer.Option(help="Reuse the KV of prompt prefixes seen before (per adapter).")
    ] = True,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Most tokens per request, prompt + completion (default: the base's).",
            show_default=False,
        ),
    ] = None,
    adapter_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder local adapters may be loaded from; repeat for several "
            "(default: LORA_OPS_ADAPTER_ROOTS; none: only s3:// and models:/ adapters).",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        bool, typer.Option(help="Load every production adapter from MLflow at start.")
    ] = True,
    api_keys: Annotated[
        Path | None,
        typer.Option(help='JSON file {"<key>": {"customer": ID, "allow_base": bool}}.'),
    ] = None,
    fleet_url: Annotated[
        str | None,
        typer.Option(
            help="Join the fleet as this URL (how the gateway reaches this replica): register "
            "it with its base at start, and load only the adapters placed on it. Without: "
            "load every production adapter of the base.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a serving replica: the base model plus adapters, OpenAI-compatible API."""
    import uvicorn

    from lora_ops.serving.access import load_api_keys
    from lora_ops.serving.app import create_app
    from lora_ops.serving.engine import Engine, EngineConfig
    from lora_ops.settings import get_settings

    settings = get_settings()
    if fleet_url is not None:
        from lora_ops.fleet.client import check_url

        fleet_url = check_url(fleet_url)
    token = admin_token or secret_value(settings.admin_token)
    grants = load_api_keys(api_keys) if api_keys else None  # checked before the model loads
    roots = _adapter_roots(adapter_root or settings.adapter_roots)
    config = EngineConfig(
        base,
        max_adapters=max_adapters,
        max_adapter_bytes=max_adapter_mb * 1024**2,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_requests_per_model=max_requests_per_model,
        kv_cache_tokens=kv_cache_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
        prefix_caching=prefix_caching,
        max_model_len=max_model_len,
        adapter_roots=roots,
        bucket=settings.bucket,
    )
    engine = Engine(config)
    app_ = create_app(engine, token, grants)
    # The ~770,000 objects of the loaded libraries and model never die; frozen, the
    # collector stops walking them in every full collection (~0.5 s pauses on 2 cores that
    # were the p99 of adapter loads).
    gc.collect()
    gc.freeze()
    if bootstrap:
        app_.state.ready = False
        threading.Thread(
            target=_bootstrap, args=(app_, engine, base, fleet_url), daemon=True
        ).start()
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        engine.close()


def _adapter_roots(roots: list[Path]) -> list[Path]:
    """The roots, each an existing folder: a typo must not silently refuse every load."""
    for root in roots:
        if not root.is_dir():
            raise InputError(f"{root} is not a folder", field="--adapter-root")
    return roots


def _bootstrap(app_: Any, engine: Any, base: str, fleet_url: str | None) -> None:
    """Join the fleet (given ``fleet_url``), load the production adapters this replica
    serves from the registry, then report ready."""
    from lora_ops import base_models
    from lora_ops.serving.bootstrap import converge

    def ready() -> None:
        app_.state.ready = True

    folder = base_models.resolve_base(base)
    if fleet_url is not None:
        _join_fleet(fleet_url, base_models.base_name(folder), base_models.base_sha256(folder))
    converge(engine, base_models.base_name(folder), ready, fleet_url=fleet_url)


def _join_fleet(url: str, base: str, base_sha256: str) -> None:
    """Register this replica (a drained one stays drained until the gateway's health
    checks bring it back); the database unreachable is logged, the replica serves on."""
    import logging

    from lora_ops.db import Database

    try:
        Database.from_settings().add_replica(url, base, base_sha256)
    except Exception:
        logging.getLogger(__name__).exception("could not register %s with the fleet", url)


@fleet_app.command("add")
def fleet_add(
    urls: Annotated[list[str], typer.Argument(help="Replica base URLs, http://host:port.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="The base the replicas serve (catalogue name or folder), for replicas that "
            "do not declare it on /health (vLLM). Default: what each declares.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Register replicas with the base each serves (already registered ones are kept)."""
    from lora_ops.fleet import BaseIdentity, Fleet, check_url

    checked = [check_url(url) for url in urls]  # all checked before any is added
    given = None
    if base is not None:
        from lora_ops import base_models

        folder = base_models.resolve_base(base)
        given = BaseIdentity(base_models.base_name(folder), base_models.base_sha256(folder))
    fleet = Fleet()
    for url in checked:
        identity = fleet.add(url, given)
        if identity is None:
            out.print(f"added {url} (its base is not known yet: it did not answer /health "
                      "with one; give --base for a vLLM replica)")  # fmt: skip
        else:
            out.print(f"added {url} (base {identity.name}, sha256 {identity.sha256[:12]})")


@fleet_app.command("remove")
def fleet_remove(url: Annotated[str, typer.Argument(help="Replica base URL.")]) -> None:
    """Hand a replica's customers to the others (each loaded and smoke-tested first), then
    forget it (it keeps running)."""
    from lora_ops.fleet import Fleet
    from lora_ops.fleet.placer import drain
    from lora_ops.registry import Registry
    from lora_ops.settings import get_settings

    url = url.rstrip("/")
    fleet = Fleet()
    if url not in fleet.urls():
        raise InputError(f"{url} is not in the fleet", field="url")
    done = drain(fleet, Registry(), url, get_settings().fleet_copies)
    for customer, why in sorted(done.failed.items()):
        out.print(f"{customer} could not move: {why}")
    if done.failed:
        raise InputError(
            f"{url} is drained but still registered: {len(done.failed)} customers could not "
            "move; run `fleet remove` again once the fleet can take them",
            field="url",
        )
    out.print(f"removed {url} ({len(done.applied)} customers moved)")


@fleet_app.command("list")
def fleet_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per replica, for scripts.")
    ] = False,
) -> None:
    """Replicas: the base each serves, in rotation or drained, health, and placement."""
    from lora_ops.fleet import Fleet

    fleet = Fleet()
    placed: dict[str, list[str]] = {}
    for customer, urls in fleet.db.placements().items():
        for url in urls:
            placed.setdefault(url, []).append(customer)
    rows = []
    for replica in fleet.db.replicas():
        health = fleet.health(replica.url)
        rows.append(
            {
                "url": replica.url,
                "base": replica.base,
                "base_sha256": replica.base_sha256,
                "state": replica.state,
                "healthy": health.healthy,
                "health": health.detail,
                "placed": sorted(placed.get(replica.url, [])),
                "models": health.models,
            }
        )
    if as_json:
        out.print_json(data=rows)
        return
    out.print(_fleet_table(rows))


def _fleet_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("base", "state", "health", "placed", "models")
    # URLs whole, whatever the terminal's width: people copy them into other commands.
    widest = max((len(row["url"]) for row in rows), default=7)
    table.columns.insert(0, Column("replica", no_wrap=True, min_width=widest))
    for row in rows:
        health = "[green]healthy[/]" if row["healthy"] else f"[red]{row['health']}[/]"
        customers = row["placed"]
        more = f" (+{len(customers) - 8})" if len(customers) > 8 else ""
        shown = f"{len(customers)}: {', '.join(customers[:8])}{more}" if customers else "0"
        table.add_row(
            row["url"], row["base"] or "unknown", row["state"], health, shown,
            ", ".join(row["models"]),
        )  # fmt: skip
    return table


def deploy(
    customer: Annotated[str, typer.Option("--customer", help="Customer id.")],
    version: Annotated[str | None, typer.Option(help="Version number to deploy.")] = None,
    alias: Annotated[
        str, typer.Option(help="Alias to deploy when no version is given.")
    ] = "candidate",
) -> None:
    """Load a version on every replica, smoke-test it, then make it production."""
    from flows.deploy import deploy_adapter

    result = deploy_adapter(customer=customer, version=version, alias=alias)
    out.print(
        f"adapter-{customer} version {result['version']} is production on "
        f"{len(result['replicas'])} replica(s); previous: {result['previous']}"
    )


def rollback(customer: Annotated[str, typer.Option("--customer", help="Customer id.")]) -> None:
    """Serve the previous production version everywhere again."""
    from flows.deploy import rollback_adapter

    result = rollback_adapter(customer=customer)
    out.print(
        f"adapter-{customer} rolled back to version {result['version']} on "
        f"{len(result['replicas'])} replica(s)"
    )


def ask(
    customer: Annotated[
        str, typer.Option("--customer", help="The adapter to ask (a customer id, or base).")
    ],
    prompts: Annotated[
        list[str], typer.Option("--prompt", help="A user message; repeat for several.")
    ],
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    replica: Annotated[
        str | None,
        typer.Option(help="Replica URL (default: the fleet's first).", show_default=False),
    ] = None,
    compare_base: Annotated[
        bool, typer.Option(help="Also ask the base model, and show the answers side by side.")
    ] = True,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
) -> None:
    """Ask a replica through its OpenAI API: the customer's adapter and the base, side by side."""
    from lora_ops import names
    from lora_ops.fleet import Fleet, check_url

    if customer != "base":
        names.check_customer(customer)
    if not [p for p in prompts if p.strip()]:
        raise InputError("give at least one non-empty --prompt", field="--prompt")
    fleet = Fleet()
    url = check_url(replica) if replica else next(iter(fleet.urls()), None)
    if url is None:
        raise InputError("the fleet has no replicas; give --replica URL", field="--replica")
    models = ["base", customer] if compare_base and customer != "base" else [customer]
    table = Table("prompt", *models, show_lines=True, title=f"answers from {url}")
    for prompt in prompts:
        answers = [fleet.chat(url, model, prompt, system, max_tokens) for model in models]
        table.add_row(prompt, *answers)
    out.print(table)
