"""The ``lora-ops`` command line: parse, check, call one library function, print."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from lora_ops.errors import InputError, LoraOpsError

app = typer.Typer(
    help="Train, register and serve one LoRA adapter per customer.", no_args_is_help=True
)
base_app = typer.Typer(help="The catalogue of base models.", no_args_is_help=True)
data_app = typer.Typer(help="Check customer data files.", no_args_is_help=True)
app.add_typer(base_app, name="base")
pipeline_app = typer.Typer(help="Run the per-customer pipeline.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
stack_app = typer.Typer(help="The embedded local stack: S3, MLflow, Prefect.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")

out = Console()
T = TypeVar("T")
err = Console(stderr=True)

BaseOption = Annotated[
    str, typer.Option("--base", help="Catalogue name (see `base list`) or a transformers folder.")
]


@base_app.command("list")
def base_list() -> None:
    """List catalogue models, their size and whether they are materialised."""
    from lora_ops import base_models

    table = Table("name", "parameters", "materialised", "size", "description")
    for row in base_models.list_bases():
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row["size_bytes"] else "-"
        table.add_row(
            row["name"],
            row["parameters"],
            "yes" if row["materialised"] else "no",
            size,
            row["description"],
        )
    out.print(table)


@base_app.command("import")
def base_import(name: Annotated[str, typer.Argument(help="Catalogue name.")]) -> None:
    """Materialise a catalogue model (once) and print its folder as the last line."""
    from lora_ops import base_models

    folder = base_models.import_base(name)
    out.print(f"sha256 {base_models.base_sha256(folder)}")
    print(folder)  # noqa: T201 - plain, unwrapped: scripts read this line


@data_app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="JSONL file of chat examples.")],
    base: Annotated[
        str | None, typer.Option("--base", help="Also count tokens with this base's template.")
    ] = None,
    max_seq_len: Annotated[int, typer.Option(min=16, help="Longest example in tokens.")] = 512,
    min_examples: Annotated[int, typer.Option(min=1, help="Fewest examples accepted.")] = 10,
) -> None:
    """Report on a data file, or list every problem as FILE:LINE: reason and exit 1."""
    from lora_ops import base_models, data

    tokenizer = base_models.load_tokenizer(base) if base else None
    report = data.validate_file(file, tokenizer, max_seq_len=max_seq_len, min_examples=min_examples)
    if not report.ok:
        for problem in report.problems:
            typer.echo(str(problem), err=True)  # one unwrapped line each: editors jump to it
        typer.echo(f"{len(report.problems)} problem(s) in {file}", err=True)
        raise typer.Exit(1)
    out.print_json(json.dumps(report.summary()))


Rank = Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")]
Alpha = Annotated[float, typer.Option(help="LoRA alpha (scaling alpha/r).")]
Dropout = Annotated[float, typer.Option(help="Dropout on the LoRA path.")]
Targets = Annotated[str, typer.Option(help="Comma-separated module-name suffixes.")]
RsLora = Annotated[bool, typer.Option(help="Scale by alpha/sqrt(r).")]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate.")]
Epochs = Annotated[int, typer.Option(help="Passes over the data.")]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after N steps.")]
BatchSize = Annotated[int, typer.Option(help="Examples per micro-batch.")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per step.")]
MaxSeqLen = Annotated[int, typer.Option(help="Longest example in tokens.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
CheckpointEvery = Annotated[int | None, typer.Option(help="Checkpoint every N steps.")]
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def _train_config(**options: Any) -> Any:
    """TrainConfig from the shared training options; a bad value names its option."""
    from lora_ops.config import LoraSpec, TrainConfig

    targets = tuple(t.strip() for t in options.pop("target_modules").split(",") if t.strip())
    lora = {
        "r": options.pop("rank"),
        "alpha": options.pop("alpha"),
        "dropout": options.pop("dropout"),
        "use_rslora": options.pop("rslora"),
    }
    options["learning_rate"] = options.pop("lr")
    return _checked(lambda: TrainConfig(lora=LoraSpec(**lora, target_modules=targets), **options))


@app.command()
def train(
    base: BaseOption,
    data: Annotated[Path, typer.Option("--data", help="JSONL file of chat examples.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Adapter folder to write.")],
    rank: Rank = 8,
    alpha: Alpha = 16.0,
    dropout: Dropout = 0.0,
    target_modules: Targets = DEFAULT_TARGETS,
    rslora: RsLora = False,
    lr: LearningRate = 2e-4,
    epochs: Epochs = 1,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    max_seq_len: MaxSeqLen = 512,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = False,
) -> None:
    """Train a LoRA adapter locally (no servers) and write it in PEFT's format."""
    from lora_ops.train import train_from_files

    config = _train_config(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        rslora=rslora,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    result = train_from_files(base, data, config, out_dir, resume=resume)
    out.print(f"base eval loss    {result.base_eval_loss:.4f}")
    out.print(f"adapted eval loss {result.eval_loss:.4f}")
    out.print(f"{result.steps} steps, {result.tokens_per_second:.0f} tokens/s")
    print(result.adapter_dir)  # noqa: T201 - last line: the adapter folder


@pipeline_app.command("run")
def pipeline_run(
    customer: Annotated[str, typer.Option("--customer", help="Customer id, e.g. acme.")],
    data: Annotated[str, typer.Option("--data", help="JSONL path or s3://bucket/key.")],
    base: BaseOption = "smollm2-135m-instruct",
    rank: Rank = 8,
    alpha: Alpha = 16.0,
    dropout: Dropout = 0.0,
    target_modules: Targets = DEFAULT_TARGETS,
    rslora: RsLora = False,
    lr: LearningRate = 2e-4,
    epochs: Epochs = 1,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    max_seq_len: MaxSeqLen = 512,
    seed: Seed = 0,
    checkpoint_every: CheckpointEvery = 20,
    min_improvement: Annotated[
        float, typer.Option(min=0, max=0.99, help="Needed relative loss cut over the base.")
    ] = 0.05,
    production_tolerance: Annotated[
        float, typer.Option(min=0, max=0.99, help="How much worse than production is allowed.")
    ] = 0.02,
) -> None:
    """Run the retrain flow for one customer: prep, train, evaluate, register."""
    from lora_ops import names

    names.check_customer(customer)
    config = _train_config(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        rslora=rslora,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    _point_at_local_stack()
    from flows.retrain import retrain

    result = retrain(
        customer=customer,
        data_uri=data,
        base=base,
        config=config,
        min_improvement=min_improvement,
        production_tolerance=production_tolerance,
    )
    _print_pipeline_result(result)


def _point_at_local_stack() -> None:
    """Use the embedded stack's servers when it is up and nothing else is configured."""
    from lora_ops import stack

    for name, value in stack.service_env_if_up().items():
        os.environ.setdefault(name, value)


def _print_pipeline_result(result: dict[str, Any]) -> None:
    from lora_ops import registry

    if not result["new_version"]:
        out.print(
            f"nothing new: version {result['version']} of adapter-{result['customer']} "
            "already holds this base, data and config"
        )
        return
    gate = result["gate"]
    out.print(
        f"gate passed: eval loss {gate['candidate_loss']:.4f} vs base "
        f"{gate['base_loss']:.4f} ({gate['improvement']:.1%} better)"
    )
    out.print(f"MLflow run: {registry.Registry().run_url(result['run_id'])}")
    out.print(
        f"registered adapter-{result['customer']} version {result['version']} "
        "with alias 'candidate'"
    )


@app.command()
def merge(
    base: BaseOption,
    adapter: Annotated[Path, typer.Option("--adapter", help="PEFT-format adapter folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Merged model folder to write.")],
) -> None:
    """Merge an adapter into the base and write a plain transformers model folder."""
    from lora_ops.adapters import merge_to_folder

    print(merge_to_folder(base, adapter, out_dir))  # noqa: T201


@app.command()
def generate(
    base: BaseOption,
    prompt: Annotated[str, typer.Option("--prompt", help="The user's message.")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="Adapter folder.")] = None,
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
) -> None:
    """Print the greedy reply to PROMPT, rendered with the base's chat template."""
    from lora_ops.adapters import load_adapted
    from lora_ops.evaluate import generate_reply

    if not prompt.strip():
        raise InputError("must not be empty", field="--prompt")
    model, tokenizer = load_adapted(base, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    print(generate_reply(model, tokenizer, messages, max_new_tokens))  # noqa: T201


@app.command()
def serve(
    base: BaseOption = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    admin_token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token for load/unload (default: LORA_OPS_ADMIN_TOKEN).", show_default=False
        ),
    ] = None,
    max_adapters: Annotated[int, typer.Option(min=1, help="Adapters kept in memory.")] = 8,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests per batch.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(min=0, help="Wait for company, ms.")] = 10.0,
    bootstrap: Annotated[
        bool, typer.Option(help="Load every production adapter from MLflow at start.")
    ] = True,
    api_keys: Annotated[
        Path | None,
        typer.Option(help='JSON file {"<key>": {"customer": ID, "allow_base": bool}}.'),
    ] = None,
) -> None:
    """Run a serving replica: the base model plus adapters, OpenAI-compatible API."""
    import uvicorn

    from lora_ops.serving.access import load_api_keys
    from lora_ops.serving.app import create_app
    from lora_ops.serving.engine import Engine
    from lora_ops.settings import get_settings

    token = admin_token or _secret(get_settings().admin_token)
    grants = load_api_keys(api_keys) if api_keys else None  # checked before the model loads
    engine = Engine(
        base,
        max_adapters=max_adapters,
        max_batch_size=max_batch_size,
        batch_window_s=batch_window_ms / 1000,
    )
    app_ = create_app(engine, token, grants)
    if bootstrap:
        app_.state.ready = False
        threading.Thread(target=_bootstrap, args=(app_, engine, base), daemon=True).start()
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        engine.close()


def _bootstrap(app_: Any, engine: Any, base: str) -> None:
    """Load every production adapter for this base from the registry, then report ready."""
    from lora_ops import base_models
    from lora_ops.serving.bootstrap import load_production_adapters

    try:
        load_production_adapters(engine, base_models.base_name(base_models.resolve_base(base)))
    except Exception:
        logging.getLogger(__name__).exception("the registry could not be read at start-up")
    app_.state.ready = True


def _secret(value: Any) -> str | None:
    return None if value is None else str(value.get_secret_value())


fleet_app = typer.Typer(help="The serving replicas deploys go to.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("add")
def fleet_add(
    urls: Annotated[list[str], typer.Argument(help="Replica base URLs, http://host:port.")],
) -> None:
    """Register one or more replicas (already registered ones are kept as they are)."""
    from lora_ops.fleet import Fleet, check_url

    checked = [check_url(url) for url in urls]  # all checked before any is added
    fleet = Fleet()
    for url in checked:
        out.print(f"added {fleet.add(url)}")


@fleet_app.command("remove")
def fleet_remove(url: Annotated[str, typer.Argument(help="Replica base URL.")]) -> None:
    """Forget a replica (it keeps running)."""
    from lora_ops.fleet import Fleet

    if not Fleet().remove(url.rstrip("/")):
        raise InputError(f"{url} is not in the fleet", field="url")
    out.print(f"removed {url}")


@fleet_app.command("list")
def fleet_list() -> None:
    """Replicas with their health and the adapters they serve."""
    from lora_ops.fleet import Fleet

    fleet = Fleet()
    table = Table("replica", "health", "models")
    for url in fleet.urls():
        health = fleet.health(url)
        state = "[green]healthy[/]" if health.healthy else f"[red]{health.detail}[/]"
        table.add_row(url, state, ", ".join(health.models))
    out.print(table)


@app.command()
def deploy(
    customer: Annotated[str, typer.Option("--customer", help="Customer id.")],
    version: Annotated[str | None, typer.Option(help="Version number to deploy.")] = None,
    alias: Annotated[
        str, typer.Option(help="Alias to deploy when no version is given.")
    ] = "candidate",
) -> None:
    """Load a version on every replica, smoke-test it, then make it production."""
    from flows.deploy import deploy_adapter

    _point_at_local_stack()
    result = deploy_adapter(customer=customer, version=version, alias=alias)
    out.print(
        f"adapter-{customer} version {result['version']} is production on "
        f"{len(result['replicas'])} replica(s); previous: {result['previous']}"
    )


@app.command()
def rollback(customer: Annotated[str, typer.Option("--customer", help="Customer id.")]) -> None:
    """Serve the previous production version everywhere again."""
    from flows.deploy import rollback_adapter

    _point_at_local_stack()
    result = rollback_adapter(customer=customer)
    out.print(
        f"adapter-{customer} rolled back to version {result['version']} on "
        f"{len(result['replicas'])} replica(s)"
    )


def _stack_table(rows: list[Any]) -> Table:
    table = Table("service", "url", "pid", "state")
    for row in rows:
        state = "[green]healthy[/]" if row.healthy else f"[red]{row.detail}[/]"
        table.add_row(row.name, row.url, str(row.pid or "-"), state)
    return table


@stack_app.command("up")
def stack_up() -> None:
    """Start S3, MLflow and Prefect on 127.0.0.1 (only what is not running yet)."""
    from lora_ops import stack

    state = stack.up()
    out.print(_stack_table(list(state.services)))
    out.print("started: " + (", ".join(state.started) or "nothing, all parts were already up"))
    out.print(f"MLflow UI:  {state.url('mlflow')}")
    out.print(f"Prefect UI: {state.url('prefect').removesuffix('/api')}")
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


def _checked(build: Callable[[], T]) -> T:
    """Run a pydantic constructor; its first complaint becomes an InputError with the field."""
    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(first["msg"], field=field) from None


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for chatty in ("httpx", "httpcore", "urllib3", "botocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        app()  # usage errors and exit codes are handled inside, as Click does
    except LoraOpsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
