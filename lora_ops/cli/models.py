"""Commands that need no servers: the base catalogue, data checks, local training, merging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lora_ops.cli.common import BaseOption, out
from lora_ops.cli.options import TrainingOverrides, train_config, training_options
from lora_ops.errors import InputError

if TYPE_CHECKING:  # only for hints: datasets is imported where data is prepared
    from lora_ops.data.arrow_store import ArrowPrepared

base_app = typer.Typer(help="The catalogue of base models.", no_args_is_help=True)
data_app = typer.Typer(help="Check customer data files.", no_args_is_help=True)


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
    file: Annotated[Path, typer.Argument(help="JSONL, Parquet or CSV file of chat examples.")],
    base: Annotated[
        str | None, typer.Option("--base", help="Also count tokens with this base's template.")
    ] = None,
    max_seq_len: Annotated[int, typer.Option(min=16, help="Longest example in tokens.")] = 512,
    min_examples: Annotated[int, typer.Option(min=1, help="Fewest examples accepted.")] = 10,
) -> None:
    """Report on a data file, or list every problem as FILE:LINE: reason and exit 1."""
    from lora_ops import data

    # Structure first: a broken line needs no tokenizer, and loading one (torch and
    # transformers) costs seconds before the answer. Tokens are counted once it passes.
    report = data.validate_file(file, None, max_seq_len=max_seq_len, min_examples=min_examples)
    if report.ok and base:
        from lora_ops import base_models

        tokenizer = base_models.load_tokenizer(base)
        report = data.validate_file(file, tokenizer, max_seq_len, min_examples)
    if not report.ok:
        for problem in report.problems:
            typer.echo(str(problem), err=True)  # one unwrapped line each: editors jump to it
        typer.echo(f"{len(report.problems)} problem(s) in {file}", err=True)
        raise typer.Exit(1)
    out.print_json(json.dumps(report.summary()))


@training_options(with_defaults=True)
def train(
    base: BaseOption,
    data: Annotated[
        Path, typer.Option("--data", help="JSONL, Parquet or CSV file of chat examples.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Adapter folder to write.")],
    training: TrainingOverrides,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = False,
    validation_data: Annotated[
        Path | None,
        typer.Option(
            "--validation-data",
            help="JSONL, Parquet or CSV file of held-out examples, instead of a share of --data.",
        ),
    ] = None,
    data_cache: Annotated[
        Path | None,
        typer.Option(
            "--data-cache",
            help="Folder of prepared (tokenized) data sets, reused while the data, base "
            "tokenizer, --max-seq-len and split are unchanged. "
            "[default: $LORA_OPS_CACHE_DIR/datasets, ~/.cache/lora-ops/datasets]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter locally (no servers) and write it in PEFT's format."""
    from lora_ops.training.local import train_from_files

    config = train_config(training)
    result = train_from_files(
        base,
        data,
        config,
        out_dir,
        resume=resume,
        validation_path=validation_data,
        data_cache=data_cache,
        on_data=_report_data,
    )
    out.print(f"base eval loss    {result.base_eval_loss:.4f}")
    out.print(f"adapted eval loss {result.eval_loss:.4f}")
    if result.best_step is not None:
        out.print(
            f"kept step {result.best_step} (last step's eval loss {result.last_eval_loss:.4f})"
        )
    out.print(f"{result.steps} steps, {result.tokens_per_second:.0f} tokens/s")
    print(result.adapter_dir)  # noqa: T201 - last line: the adapter folder


def _report_data(dataset: ArrowPrepared) -> None:
    if dataset.cache_hit:
        out.print(f"data cache hit    {dataset.folder} (nothing tokenized)")
    else:
        sizes = f"{len(dataset.train)} train, {len(dataset.eval)} eval examples"
        out.print(f"data prepared     {sizes} into {dataset.folder}")


def merge(
    base: BaseOption,
    adapter: Annotated[Path, typer.Option("--adapter", help="PEFT-format adapter folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Merged model folder to write.")],
) -> None:
    """Merge an adapter into the base and write a plain transformers model folder."""
    from lora_ops.adapters import merge_to_folder

    print(merge_to_folder(base, adapter, out_dir))  # noqa: T201


def generate(
    base: BaseOption,
    prompt: Annotated[str, typer.Option("--prompt", help="The user's message.")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="Adapter folder.")] = None,
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
) -> None:
    """Print the greedy reply to PROMPT, rendered with the base's chat template."""
    from lora_ops.adapters import ADAPTER_NAME, load_adapted
    from lora_ops.generation import generate_reply

    if not prompt.strip():
        raise InputError("must not be empty", field="--prompt")
    model, tokenizer = load_adapted(base, adapter)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    on = ADAPTER_NAME if adapter else None
    print(generate_reply(model, tokenizer, messages, max_new_tokens, on))  # noqa: T201
