"""Schedules and workers: Prefect deployments from the customers table, and who runs them."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from lora_ops.cli.common import out
from lora_ops.errors import InputError

schedule_app = typer.Typer(
    help="Prefect deployments retrain/<customer> and their schedules.", no_args_is_help=True
)
db_app = typer.Typer(help="The service database and its migrations.", no_args_is_help=True)


def _require_prefect_server() -> str:
    from lora_ops.settings import get_settings

    url = get_settings().prefect_api_url
    if not url:
        raise InputError(
            "no Prefect server: set PREFECT_API_URL, or start the local one with "
            "`lora-ops stack up`",
            field="PREFECT_API_URL",
        )
    return url


@schedule_app.command("sync")
def schedule_sync() -> None:
    """Make Prefect's deployments match the customers table (create, update, pause)."""
    from flows.schedules import sync_schedules
    from lora_ops import customers

    url = _require_prefect_server()
    report = sync_schedules(customers.list_customers())
    for name in report.applied:
        out.print(f"applied {name}")
    for name in report.paused:
        out.print(f"paused  {name} (customer inactive or removed)")
    out.print(f"Prefect: {url.removesuffix('/api')}/deployments")


@schedule_app.command("list")
def schedule_list(
    runs: Annotated[int, typer.Option(min=1, max=20, help="Next runs shown per customer.")] = 3,
) -> None:
    """Every retrain/<customer> deployment, its schedule and its next runs."""
    from flows.schedules import list_schedules

    _require_prefect_server()
    table = Table("deployment", "schedule", "state", "next runs")
    for row in list_schedules(runs):
        nexts = "\n".join(f"{when:%Y-%m-%d %H:%M %Z}" for when in row.next_runs) or "-"
        state = "[yellow]paused[/]" if row.paused else "active"
        table.add_row(f"retrain/{row.customer}", "\n".join(row.schedules) or "-", state, nexts)
    out.print(table)


def worker(
    pool: Annotated[
        str | None,
        typer.Option(help="Work pool to take runs from (default LORA_OPS_WORK_POOL, lora-ops)."),
    ] = None,
    healthcheck_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Serve Prefect's /health on 127.0.0.1:PORT."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Most flow runs at once.")] = None,
    stop_grace: Annotated[
        float,
        typer.Option(
            min=0, help="On SIGTERM/SIGINT, seconds a running flow run gets to stop (then killed)."
        ),
    ] = 20.0,
) -> None:
    """Run a Prefect worker for lora-ops' flows (retrain, train-adapter, review-sweep).

    SIGTERM or SIGINT stops it: it takes no new runs, hands back the runs it is executing
    (they go back to Scheduled for the next worker; a retrain resumes from its last
    checkpoint) and exits 0.
    """
    from flows.schedules import prepare_work_pool
    from flows.worker import WorkerSupervisor
    from lora_ops.settings import get_settings

    url = _require_prefect_server()
    pool = pool or get_settings().work_pool
    prepare_work_pool(pool)
    env = dict(os.environ)
    # lora_ops's own log lines (training steps, uploads) go into the runs' logs in the UI.
    loggers = [env.get("PREFECT_LOGGING_EXTRA_LOGGERS", ""), "lora_ops"]
    env["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(filter(None, loggers))
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    command += ["--type", "process"]
    if healthcheck_port is not None:
        env["PREFECT_WORKER_WEBSERVER_HOST"] = "127.0.0.1"
        env["PREFECT_WORKER_WEBSERVER_PORT"] = str(healthcheck_port)
        command.append("--with-healthcheck")
    if limit is not None:
        command += ["--limit", str(limit)]
    out.print(f"worker on pool {pool}, Prefect at {url}")
    sys.stdout.flush()
    raise typer.Exit(WorkerSupervisor(command, env, grace_s=stop_grace).run())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the service database to the newest schema (Alembic migrations)."""
    from lora_ops import db
    from lora_ops.settings import get_settings

    url = get_settings().database_url
    applied = db.upgrade_database(db.create_engine_for(url))
    out.print(f"applied {', '.join(applied)}" if applied else "already at the newest schema")


@db_app.command("status")
def db_status() -> None:
    """The service database's schema revision and the newest one."""
    from lora_ops import db
    from lora_ops.settings import get_settings

    current, head = db.database_revision(get_settings().database_url)
    out.print(f"revision {current or 'none'} (newest {head})")
    if current != head:
        raise typer.Exit(1)
