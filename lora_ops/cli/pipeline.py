"""Running the per-customer pipeline, here or on a worker, and reviewing what it registered."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from lora_ops.cli.common import CustomerOption, out
from lora_ops.cli.options import TrainingOverrides, train_config, training_options
from lora_ops.defaults import DEFAULT_BASE, DEFAULT_GATE
from lora_ops.errors import InputError

pipeline_app = typer.Typer(help="Run the per-customer pipeline.", no_args_is_help=True)

# What a run uses for a customer without a record (a record's fields win, then the options).
DEFAULTS: dict[str, Any] = {
    "base": DEFAULT_BASE,
    "config": {"checkpoint_every": 20},
    **DEFAULT_GATE.model_dump(),
    "auto_deploy": False,
    "require_review": False,
}


@pipeline_app.command("run")
@training_options()
def pipeline_run(
    customer: CustomerOption,
    data: Annotated[
        str | None,
        typer.Option("--data", help="JSONL path or s3://bucket/key (default: the record's)."),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (default: the record's).")
    ] = None,
    validation_data: Annotated[
        str | None,
        typer.Option(
            "--validation-data",
            help="Held-out JSONL path or s3://bucket/key, evaluated on instead of a share "
            "of the data (default: the record's).",
        ),
    ] = None,
    *,
    training: TrainingOverrides,
    min_improvement: Annotated[
        float | None, typer.Option(min=0, max=0.99, help="Needed relative loss cut over the base.")
    ] = None,
    production_tolerance: Annotated[
        float | None,
        typer.Option(min=0, max=0.99, help="How much worse than production is allowed."),
    ] = None,
    auto_deploy: Annotated[
        bool | None, typer.Option("--auto-deploy/--no-auto-deploy", help="Deploy when it passes.")
    ] = None,
    remote: Annotated[
        bool,
        typer.Option(help="Submit to the deployment retrain/<customer> and follow it to the end."),
    ] = False,
) -> None:
    """Run the retrain flow for one customer: prep, train, evaluate, register (, deploy).

    A customer with a record (`lora-ops customers add`) needs no other option: the record
    gives data, base and training settings, and the options given here override them.
    """
    from lora_ops import names

    names.check_customer(customer)
    given = {
        "data_uri": _absolute(data),
        "validation_data_uri": _absolute(validation_data),
        "base": base,
        "min_improvement": min_improvement,
        "production_tolerance": production_tolerance,
        "auto_deploy": auto_deploy,
    }
    parameters = _retrain_parameters(customer, given, training)
    if remote:
        _run_remote(customer, parameters)
        return
    from flows.retrain import retrain

    parameters["config"] = train_config(parameters["config"])
    _print_result(cast(dict[str, Any], retrain(**parameters)))  # the final state's data


def _absolute(data: str | None) -> str | None:
    """A local path made absolute, so a worker in another folder finds the same file."""
    if data is None or data.startswith("s3://"):
        return data
    return str(Path(data).expanduser().resolve())


def _retrain_parameters(
    customer: str, given: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The record's parameters (or the defaults), with what was given on top."""
    from lora_ops import customers

    record = customers.find(customer)
    parameters = customers.retrain_parameters(record) if record else {**DEFAULTS}
    parameters["customer"] = customer
    parameters.update({name: value for name, value in given.items() if value is not None})
    parameters["config"] = customers.merge_overrides(parameters["config"], overrides)
    train_config(parameters["config"])  # checked here, before any run is made
    if not parameters.get("data_uri"):
        raise InputError(
            f"{customer} has no customer record with a data URI: give --data, or add the "
            "customer with `lora-ops customers add`",
            field="--data",
        )
    return parameters


def _run_remote(customer: str, parameters: dict[str, Any]) -> None:
    from flows.runs import follow_flow_run, submit_retrain

    run = submit_retrain(customer, parameters)
    out.print(f"flow run {run.name} ({run.id}) submitted to retrain/{customer}")
    final = follow_flow_run(run.id, lambda line: out.print(line, markup=False, highlight=False))
    if final.state is None or not final.state.is_completed():
        raise typer.Exit(1)


def _print_result(result: dict[str, Any]) -> None:
    from lora_ops import registry

    name = f"adapter-{result['customer']}"
    if not result["new_version"]:
        out.print(
            f"no new data: version {result['version']} of {name} already holds this base, "
            "data and config"
        )
        return
    gate = result["gate"]
    out.print(
        f"gate passed: eval loss {gate['candidate_loss']:.4f} vs base "
        f"{gate['base_loss']:.4f} ({gate['improvement']:.1%} better)"
    )
    out.print(f"MLflow run: {registry.Registry().run_url(result['run_id'])}")
    out.print(f"registered {name} version {result['version']} with alias 'candidate'")
    if result["status"] == "rejected":
        out.print(f"{name} version {result['version']} was rejected in review: not deployed")
    elif result["deployed"]:
        replicas = len(result["deployed"]["replicas"])
        out.print(f"deployed {name} version {result['version']} to {replicas} replica(s)")


def approve(
    customer: CustomerOption,
    version: Annotated[str, typer.Option("--version", help="The version to decide on.")],
    reject: Annotated[bool, typer.Option(help="Reject it instead: it is never deployed.")] = False,
    reviewer: Annotated[
        str | None, typer.Option(help="Who decides (default: your user name).", show_default=False)
    ] = None,
) -> None:
    """Approve (or --reject) a version that waits for review, and resume its waiting run.

    The decision is the version's MLflow tag `approved` (true or false), the same one a
    reviewer can set in the MLflow UI.
    """
    from lora_ops import names
    from lora_ops.registry import review
    from lora_ops.settings import get_settings

    names.check_customer(customer)
    who = reviewer or getpass.getuser()
    review.record_decision(customer, version, approved=not reject, reviewer=who)
    verdict = "rejected" if reject else "approved"
    out.print(f"adapter-{customer} version {version} {verdict} by {who}")
    if get_settings().prefect_api_url:
        from flows.review import resume_decided_runs

        for run_id in resume_decided_runs(customer, version):
            out.print(f"resumed flow run {run_id}")
