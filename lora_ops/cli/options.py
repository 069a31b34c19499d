"""The training options, declared once for every command that trains or records training.

``train`` gives each option TrainConfig's default; ``pipeline run`` and ``customers
add|update`` default them to None, "not given", so a customer's record fills the gap (or, for
``update``, the stored value stays). A command takes them all through ``@training_options``
and receives them as one ``training`` argument: TrainConfig overrides, nested like it.
Adding an option is one row in ``TRAINING_OPTIONS``.

TrainConfig itself is not imported here: it imports the LoRA core, and so torch, and
``--help`` must stay fast. The defaults below are checked against it by the tests.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from lora_ops.cli.common import checked

R = TypeVar("R")
# What a command gets as ``training``: only the options that were given, nested like
# TrainConfig, e.g. {"lora": {"r": 8}, "learning_rate": 0.1}.
TrainingOverrides = dict[str, Any]


def _module_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _epochs(value: Any) -> Any:
    """A count of passes as a number, "auto" as it is; anything else reaches the check."""
    text = str(value).strip()
    return int(text) if text.isdigit() else text


@dataclass(frozen=True)
class TrainingOption:
    """One option: its flag, where its value goes in TrainConfig, and TrainConfig's default."""

    flag: str  # "--max-seq-len", or "--rslora/--no-rslora"; the parameter is max_seq_len
    field: str  # dotted path in TrainConfig, e.g. "lora.r"
    kind: type
    default: Any  # TrainConfig's: `train` shows it, the other commands start from None
    help: str
    short: str | None = None
    parse: Callable[[Any], Any] | None = None  # the flag's text to the field's value

    @property
    def name(self) -> str:
        return self.flag.split("/")[0].removeprefix("--").replace("-", "_")


TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    TrainingOption("--rank", "lora.r", int, 8, "LoRA rank r.", short="-r"),
    TrainingOption("--alpha", "lora.alpha", float, 16.0, "LoRA alpha (scaling alpha/r)."),
    TrainingOption("--dropout", "lora.dropout", float, 0.0, "Dropout on the LoRA path."),
    TrainingOption(
        "--target-modules",
        "lora.target_modules",
        str,
        None,
        "Comma-separated module-name suffixes, or all-linear (every linear layer but the "
        "output head). Default: the base architecture's attention projections.",
        parse=_module_names,
    ),
    TrainingOption(
        "--rslora/--no-rslora", "lora.use_rslora", bool, False, "Scale by alpha/sqrt(r)."
    ),
    TrainingOption("--lr", "learning_rate", float, 2e-4, "Peak learning rate."),
    TrainingOption(
        "--epochs",
        "epochs",
        str,
        1,
        "Passes over the data, or auto: from the example count, as OpenAI's fine-tuning "
        "picks them (3; up to 25 for under 34 examples; fewer past 8,333).",
        parse=_epochs,
    ),
    TrainingOption("--max-steps", "max_steps", int, None, "Stop after N steps."),
    TrainingOption("--batch-size", "batch_size", int, 8, "Examples per micro-batch."),
    TrainingOption("--grad-accum", "grad_accum", int, 1, "Micro-batches per step."),
    TrainingOption("--max-seq-len", "max_seq_len", int, 512, "Longest example in tokens."),
    TrainingOption(
        "--packing/--no-packing",
        "packing",
        bool,
        False,
        "Pack short examples into rows of up to --max-seq-len tokens, attention kept inside "
        "each example; --batch-size then counts rows.",
    ),
    TrainingOption(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        "gradient_checkpointing",
        bool,
        False,
        "Recompute activations in the backward pass: less memory, more time.",
    ),
    TrainingOption(
        "--base-dtype",
        "base_dtype",
        str,
        "auto",
        "The frozen base's weights: auto (bfloat16 on CUDA, float32 elsewhere), float32 or "
        "bfloat16. LoRA weights and optimizer state stay float32.",
    ),
    TrainingOption(
        "--quantize",
        "quantize",
        str,
        None,
        "nf4: hold the frozen base in 4-bit NF4 (QLoRA; pip install 'lora-ops[qlora]').",
    ),
    TrainingOption("--seed", "seed", int, 0, "Random seed."),
    TrainingOption(
        "--checkpoint-every", "checkpoint_every", int, None, "Checkpoint every N steps."
    ),
    TrainingOption(
        "--eval-every",
        "eval_every",
        int,
        None,
        "Held-out loss every N steps (and after the last); the best-scoring weights, not "
        "the last, become the adapter.",
    ),
    TrainingOption(
        "--early-stopping-patience",
        "early_stopping_patience",
        int,
        None,
        "Stop after P held-out evaluations without improvement (needs --eval-every).",
    ),
    TrainingOption(
        "--warm-start",
        "warm_start",
        str,
        None,
        "production: start from the customer's production adapter (same base and LoRA "
        "shape), for incremental data.",
    ),
)


def training_overrides(**options: Any) -> TrainingOverrides:
    """TrainConfig overrides (nested like TrainConfig) from the options that were given."""
    by_name = {option.name: option for option in TRAINING_OPTIONS}
    overrides: TrainingOverrides = {}
    for name, value in options.items():
        if value is None:
            continue
        option = by_name[name]
        *parents, leaf = option.field.split(".")
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = option.parse(value) if option.parse else value
    return overrides


def train_config(overrides: TrainingOverrides) -> Any:
    """TrainConfig from overrides; a bad value names its field."""
    from lora_ops.config import TrainConfig

    return checked(lambda: TrainConfig.model_validate(overrides))


def training_options(
    *, with_defaults: bool = False
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command every training option, where its ``training`` parameter stands.

    Typer reads a command's options from its signature, so the decorated command shows one
    keyword argument per option (in table order, in place of ``training``) and is called
    with their overrides as ``training``.

    Args:
        with_defaults: each option defaults to TrainConfig's value (``train``). Without, an
            option not given is None and stays out of the overrides.
    """

    def expand(command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        parameters = list(signature.parameters.values())
        names = [p.name for p in parameters]
        if "training" not in names:
            raise TypeError(f"{command.__name__} needs a `training` parameter to expand")
        at = names.index("training")
        before, after = parameters[:at], parameters[at + 1 :]
        options = [_parameter(option, with_defaults) for option in TRAINING_OPTIONS]
        # Keyword-only from here on: the options have defaults, what follows may not, and
        # Typer passes every value by name anyway.
        tail = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in after]

        @functools.wraps(command)
        def run(**given: Any) -> R:
            chosen = {option.name: given.pop(option.name) for option in TRAINING_OPTIONS}
            return command(**given, training=training_overrides(**chosen))

        expanded = [*before, *options, *tail]
        run.__signature__ = signature.replace(parameters=expanded)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in expanded}
        return run

    return expand


def _parameter(option: TrainingOption, with_defaults: bool) -> inspect.Parameter:
    default = option.default if with_defaults else None
    kind: Any = option.kind if default is not None else option.kind | None
    flags = (option.flag, option.short) if option.short else (option.flag,)
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(*flags, help=option.help)],
    )
