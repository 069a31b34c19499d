"""``lora-ops api``: OpenAI's fine-tuning API over the pipeline; ``lora-ops keys``: its keys."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from lora_ops.cli.common import out, secret_value

keys_app = typer.Typer(
    help="Customers' keys to the fine-tuning API (stored as sha256 only).", no_args_is_help=True
)


def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8090,
    max_file_mb: Annotated[
        int, typer.Option(min=1, max=1 << 20, help="Largest upload accepted, in MiB.")
    ] = 512,
    refresh_s: Annotated[
        float, typer.Option(min=0.2, help="Seconds between status updates of active jobs.")
    ] = 5.0,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            help="POST fine_tuning.job.succeeded|failed|cancelled events here, signed as "
            "OpenAI signs them with LORA_OPS_WEBHOOK_SECRET (a whsec_ secret).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve OpenAI's files and fine_tuning.jobs API: jobs are runs of retrain/<customer>.

    Every call needs a key: a customer's (`lora-ops keys create`) sees only that customer's
    files, jobs and models; the admin token (LORA_OPS_ADMIN_TOKEN) sees all.
    """
    import uvicorn

    from flows.jobs import PrefectJobRuns
    from lora_ops.api.app import create_app
    from lora_ops.api.files import Uploads
    from lora_ops.api.jobs import Jobs
    from lora_ops.api.routes import Services
    from lora_ops.api.webhooks import Webhook
    from lora_ops.db import Database
    from lora_ops.db.finetuning import FineTuningRecords
    from lora_ops.errors import InputError
    from lora_ops.registry import Registry
    from lora_ops.settings import get_settings
    from lora_ops.storage import Storage

    settings = get_settings()
    records = FineTuningRecords(Database.from_settings(settings))
    storage = Storage.from_settings(settings)
    storage.ensure_bucket(settings.bucket)
    registry = Registry()
    runs = PrefectJobRuns()
    services = Services(
        records=records,
        uploads=Uploads(records, storage, settings.bucket, max_file_mb << 20),
        jobs=Jobs(records, runs, registry),
        runs=runs,
        registry=registry,
        storage=storage,
        bucket=settings.bucket,
        admin_token=secret_value(settings.admin_token),
    )
    webhook = None
    if webhook_url is not None:
        secret = secret_value(settings.webhook_secret)
        if not secret:
            raise InputError(
                "set LORA_OPS_WEBHOOK_SECRET to a whsec_ secret to sign webhooks",
                field="webhook_url",
            )
        webhook = Webhook(webhook_url, secret)
    app = create_app(services, refresh_s, webhook)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@keys_app.command("create")
def create(
    customer: Annotated[str, typer.Option(help="The customer the key belongs to.")],
    label: Annotated[str, typer.Option(help="A note to tell keys apart.")] = "",
) -> None:
    """Make a key for a customer and print it: it is shown this once."""
    from lora_ops.api.keys import create_key
    from lora_ops.db import Database
    from lora_ops.db.finetuning import FineTuningRecords

    typer.echo(create_key(FineTuningRecords(Database.from_settings()), customer, label))


@keys_app.command("list")
def list_keys(
    customer: Annotated[str | None, typer.Option(help="Only this customer's keys.")] = None,
) -> None:
    """Every key: its sha256 prefix, customer, label, when made and revoked."""
    from lora_ops.db import Database
    from lora_ops.db.finetuning import FineTuningRecords

    table = Table("sha256", "customer", "label", "created", "revoked")
    for row in FineTuningRecords(Database.from_settings()).keys(customer):
        revoked = f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else ""
        table.add_row(
            row.sha256[:12], row.customer, row.label, f"{row.created_at:%Y-%m-%d %H:%M}", revoked
        )
    out.print(table)


@keys_app.command("revoke")
def revoke(
    sha256_prefix: Annotated[
        str, typer.Argument(help="The key's sha256, or its first 8+ characters (from `keys list`).")
    ],
) -> None:
    """Revoke a key: calls with it get 401 from then on."""
    from lora_ops.db import Database
    from lora_ops.db.finetuning import FineTuningRecords
    from lora_ops.errors import InputError

    if len(sha256_prefix) < 8:
        raise InputError("give at least 8 characters of the sha256", field="sha256_prefix")
    revoked = FineTuningRecords(Database.from_settings()).revoke_key(sha256_prefix.lower())
    if len(revoked) == 0:
        raise InputError(f"no key that is not revoked has a sha256 starting {sha256_prefix}")
    for sha256 in revoked:
        typer.echo(f"revoked {sha256[:12]}")
