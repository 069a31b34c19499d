"""The embedded local stack: S3, MLflow and Prefect (and optionally a worker and a replica)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from lora_ops.cli.common import out

stack_app = typer.Typer(
    help="The embedded local stack: S3, MLflow, Prefect; a worker and a replica on request.",
    no_args_is_help=True,
)


def _stack_table(rows: list[Any]) -> Table:
    table = Table("service", "url", "pid", "state")
    for row in rows:
        state = "[green]healthy[/]" if row.healthy else f"[red]{row.detail}[/]"
        table.add_row(row.name, row.url, str(row.pid or "-"), state)
    return table


@stack_app.command("up")
def stack_up(
    worker: Annotated[
        bool, typer.Option(help="Also run a Prefect worker, so schedules and triggers run.")
    ] = False,
    replica: Annotated[
        bool, typer.Option(help="Also run a serving replica and add it to the fleet.")
    ] = False,
    replica_base: Annotated[
        str | None,
        typer.Option(
            help="The replica's base model (default LORA_OPS_REPLICA_BASE).", show_default=False
        ),
    ] = None,
) -> None:
    """Start S3, MLflow and Prefect on 127.0.0.1 (only what is not running yet)."""
    from lora_ops import stack
    from lora_ops.settings import get_settings

    settings = get_settings()
    if replica_base:
        settings = settings.model_copy(update={"replica_base": replica_base})
    state = stack.up(settings, worker=worker, replica=replica)
    out.print(_stack_table(list(state.services)))
    out.print("started: " + (", ".join(state.started) or "nothing, all parts were already up"))
    out.print(f"MLflow UI:  {state.url('mlflow')}")
    out.print(f"Prefect UI: {state.url('prefect').removesuffix('/api')}")
    if replica:
        out.print(f"Replica:    {state.url('replica')}/v1 (OpenAI API)")
    out.print('Point a shell at it: eval "$(lora-ops stack env)"')


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `stack up` started; the data stays."""
    from lora_ops import stack

    stopped = stack.down()
    out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """Each part, its URL and health; exit 1 when a started part is not healthy."""
    from lora_ops import stack

    rows = stack.status()
    out.print(_stack_table(rows))
    if any(row.pid is not None and not row.healthy for row in rows):
        raise typer.Exit(1)


@stack_app.command("env")
def stack_env() -> None:
    """Print `export NAME=value` lines that point a shell and the MLflow/Prefect CLIs here."""
    from lora_ops import stack

    for line in stack.env_lines():
        print(line)  # noqa: T201 - for eval in a shell
