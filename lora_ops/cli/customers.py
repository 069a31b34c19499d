"""Customer records: add, update, list, show, remove."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from lora_ops.cli.common import out
from lora_ops.cli.options import TrainingOverrides, training_options

customers_app = typer.Typer(
    help="Customers: whose adapter, trained on what, how and when.", no_args_is_help=True
)

CustomerId = Annotated[str, typer.Argument(help="Customer id: a-z, 0-9 and '-', up to 63.")]
Name = Annotated[str | None, typer.Option("--name", help="Display name (default: the id).")]
Data = Annotated[str | None, typer.Option("--data", help="Chat JSONL: a local file or s3://.")]
ValidationData = Annotated[
    str | None,
    typer.Option(
        "--validation-data",
        help="Held-out chat JSONL (local or s3://), checked like --data, evaluated on "
        "instead of a share of the data.",
    ),
]
Base = Annotated[str | None, typer.Option("--base", help="Catalogue name or a model folder.")]
MinImprovement = Annotated[
    float | None, typer.Option(help="Relative eval-loss gain over the base needed to pass.")
]
ProductionTolerance = Annotated[
    float | None, typer.Option(help="How much worse than production a candidate may be.")
]
Schedule = Annotated[
    str | None, typer.Option(help="Retraining schedule in cron, e.g. '0 3 * * *'.")
]
Timezone = Annotated[str | None, typer.Option(help="IANA time zone of the schedule (UTC).")]
AutoDeploy = Annotated[
    bool | None, typer.Option("--auto-deploy/--no-auto-deploy", help="Deploy what passes.")
]
RequireReview = Annotated[
    bool | None,
    typer.Option("--require-review/--no-require-review", help="Hold deploys for approval."),
]
Active = Annotated[
    bool | None, typer.Option("--active/--inactive", help="Inactive customers never run.")
]


def _fields(**given: Any) -> dict[str, Any]:
    """The record fields among ``given`` that were set (None: not given)."""
    renamed = {
        "name": "display_name",
        "data": "data_uri",
        "validation_data": "validation_data_uri",
        "base": "base_model",
    }
    return {renamed.get(key, key): value for key, value in given.items() if value is not None}


@customers_app.command("add")
@training_options()
def customers_add(
    customer: CustomerId,
    data: Annotated[str, typer.Option("--data", help="Chat JSONL: a local file or s3://.")],
    name: Name = None,
    base: Base = None,
    validation_data: ValidationData = None,
    *,
    training: TrainingOverrides,
    min_improvement: MinImprovement = None,
    production_tolerance: ProductionTolerance = None,
    schedule: Schedule = None,
    timezone: Timezone = None,
    auto_deploy: AutoDeploy = None,
    require_review: RequireReview = None,
    active: Active = None,
    exist_ok: Annotated[
        bool, typer.Option("--exist-ok", help="Keep an existing record as it is; no error.")
    ] = False,
) -> None:
    """Add a customer; `lora-ops schedule sync` then makes its Prefect deployment."""
    from lora_ops import customers

    if exist_ok and customers.find(customer) is not None:
        out.print(f"{customer} already exists: kept as it is")
        return
    fields = _fields(
        name=name,
        data=data,
        validation_data=validation_data,
        base=base,
        min_improvement=min_improvement,
        production_tolerance=production_tolerance,
        schedule=schedule,
        timezone=timezone,
        auto_deploy=auto_deploy,
        require_review=require_review,
        active=active,
    )
    record = customers.add(customers.CustomerSpec(id=customer, training=training, **fields))
    out.print(f"added {record.id} ({record.display_name})")
    if record.schedule:
        out.print("run `lora-ops schedule sync` to schedule its retraining in Prefect")


@customers_app.command("update")
@training_options()
def customers_update(
    customer: CustomerId,
    name: Name = None,
    data: Data = None,
    base: Base = None,
    validation_data: ValidationData = None,
    *,
    no_validation_data: Annotated[
        bool,
        typer.Option("--no-validation-data", help="Hold out a share of the data again."),
    ] = False,
    training: TrainingOverrides,
    min_improvement: MinImprovement = None,
    production_tolerance: ProductionTolerance = None,
    schedule: Schedule = None,
    no_schedule: Annotated[bool, typer.Option("--no-schedule", help="Clear the schedule.")] = False,
    timezone: Timezone = None,
    auto_deploy: AutoDeploy = None,
    require_review: RequireReview = None,
    active: Active = None,
) -> None:
    """Change some of a customer's fields; training options merge into the stored ones."""
    from lora_ops import customers
    from lora_ops.errors import InputError

    if schedule is not None and no_schedule:
        raise InputError("give --schedule or --no-schedule, not both", field="schedule")
    if validation_data is not None and no_validation_data:
        raise InputError(
            "give --validation-data or --no-validation-data, not both", field="validation_data_uri"
        )
    changes = _fields(
        name=name,
        data=data,
        validation_data=validation_data,
        base=base,
        min_improvement=min_improvement,
        production_tolerance=production_tolerance,
        schedule=schedule,
        timezone=timezone,
        auto_deploy=auto_deploy,
        require_review=require_review,
        active=active,
    )
    if training:
        changes["training"] = training
    if no_schedule:
        changes["schedule"] = None
    if no_validation_data:
        changes["validation_data_uri"] = None
    if not changes:
        raise InputError("nothing to change: give at least one option", field="options")
    record = customers.update(customer, **changes)
    out.print(f"updated {record.id}: {', '.join(sorted(changes))}")
    synced = {"schedule", "timezone", "active", "training", "data_uri", "validation_data_uri"}
    if synced & set(changes):
        out.print("run `lora-ops schedule sync` to bring its Prefect deployment up to date")


@customers_app.command("list")
def customers_list(
    active_only: Annotated[bool, typer.Option("--active-only", help="Hide inactive ones.")] = False,
) -> None:
    """Every customer, one line each."""
    from lora_ops import customers

    table = Table("id", "name", "base", "schedule", "deploy", "active")
    for record in customers.list_customers(active_only):
        schedule = f"{record.schedule} ({record.timezone})" if record.schedule else "-"
        deploy = "auto" if record.auto_deploy else "manual"
        if record.require_review:
            deploy += ", reviewed"
        active = "yes" if record.active else "[yellow]no[/]"
        table.add_row(record.id, record.display_name, record.base_model, schedule, deploy, active)
    out.print(table)


@customers_app.command("show")
def customers_show(
    customer: CustomerId,
    versions: Annotated[int, typer.Option(min=1, max=50, help="Newest versions shown.")] = 5,
) -> None:
    """One customer: the record, its newest adapter versions and its last deployments."""
    from lora_ops import customers
    from lora_ops.db import Database

    record = customers.get(customer)
    fields = Table.grid(padding=(0, 2))
    for key, value in record.model_dump().items():
        fields.add_row(key, str(value))
    out.print(fields)
    out.print(_versions_table(customer, versions))
    history = Table("deployed at", "version", "replica", "status", "by", title="last deployments")
    for row in Database.from_settings().deployments(customer, limit=10):
        history.add_row(
            f"{row.started_at:%Y-%m-%d %H:%M:%S}",
            row.version,
            row.replica_url,
            row.status,
            row.triggered_by,
        )
    out.print(history)


def _versions_table(customer: str, count: int) -> Table:
    from lora_ops.registry import Registry, review
    from lora_ops.registry.tags import BASE_EVAL_LOSS_TAG, EVAL_LOSS_TAG, GATE_TAG, REVIEW_TAG

    registry = Registry()
    aliases: dict[str, list[str]] = {}
    for alias, held_by in registry.get_aliases(customer).items():
        if held_by is not None:
            aliases.setdefault(held_by, []).append(alias)
    table = Table(
        "version", "aliases", "gate", "eval loss", "base loss", "review", title="adapter versions"
    )
    for version in registry.latest_versions(customer, count):
        tags = version.tags
        decision = review.decision_of(tags)
        if decision is None:
            verdict = tags.get(REVIEW_TAG, "-")
        else:
            verdict = review.APPROVED if decision else review.REJECTED
        table.add_row(
            str(version.version),
            ", ".join(aliases.get(str(version.version), [])) or "-",
            tags.get(GATE_TAG, "-"),
            tags.get(EVAL_LOSS_TAG, "-"),
            tags.get(BASE_EVAL_LOSS_TAG, "-"),
            verdict,
        )
    return table


@customers_app.command("remove")
def customers_remove(
    customer: CustomerId,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a customer's record; its adapters and runs stay in MLflow."""
    from lora_ops import customers

    customers.get(customer)  # an unknown id is refused before asking
    if not yes:
        typer.confirm(f"remove customer {customer}?", abort=True)
    customers.remove(customer)
    out.print(f"removed {customer}; run `lora-ops schedule sync` to pause its schedule")
