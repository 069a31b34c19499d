"""The ``lora-ops`` command line: parse, check, call one library function, print.

Each module here holds one group of commands; this one puts them on one ``app``. Heavy
imports (torch, MLflow, Prefect) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from lora_ops.cli import api as api
from lora_ops.cli import customers as customers
from lora_ops.cli import gateway as gateway
from lora_ops.cli import models as models
from lora_ops.cli import pipeline as pipeline
from lora_ops.cli import scheduling as scheduling
from lora_ops.cli import serving as serving
from lora_ops.cli import stack as stack
from lora_ops.cli.common import point_at_local_stack
from lora_ops.errors import LoraOpsError

app = typer.Typer(
    help="Train, register and serve one LoRA adapter per customer.", no_args_is_help=True
)


@app.callback()
def _use_the_local_stack() -> None:
    # Before any command imports Prefect or MLflow, which read their settings once: a stack
    # that is up serves every command, unless the environment points elsewhere.
    point_at_local_stack()


app.add_typer(models.base_app, name="base")
app.add_typer(models.data_app, name="data")
app.command()(models.train)
app.command()(models.merge)
app.command()(models.generate)
app.add_typer(customers.customers_app, name="customers")
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.command()(pipeline.approve)
app.add_typer(scheduling.schedule_app, name="schedule")
app.command()(scheduling.worker)
app.command()(serving.serve)
app.add_typer(serving.fleet_app, name="fleet")
app.command()(gateway.gateway)
app.command()(api.api)
app.add_typer(api.keys_app, name="keys")
app.command()(serving.deploy)
app.command()(serving.rollback)
app.command()(serving.ask)
app.add_typer(stack.stack_app, name="stack")
app.add_typer(scheduling.db_app, name="db")

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if int(os.environ.get("RANK", "0")) > 0:
        _quiet_for_a_secondary_rank()
    for chatty in ("httpx", "httpcore", "urllib3", "botocore", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        app()  # usage errors and exit codes are handled inside, as Click does
    except LoraOpsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _quiet_for_a_secondary_rank() -> None:
    """Under ``torchrun`` only rank 0 speaks; the others would print the same again.

    Their output goes nowhere and their logging shows errors only; errors still reach
    stderr, which is where the launcher looks when a rank fails.
    """
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its logger keeps its own level
    warnings.simplefilter("ignore")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
