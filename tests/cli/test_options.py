"""The training options are one table: every command that takes them takes all of them, alike,
and `train`'s defaults are TrainConfig's."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from lora_ops.cli import app, options
from lora_ops.cli.options import (
    TRAINING_OPTIONS,
    TrainingOption,
    TrainingOverrides,
    train_config,
    training_options,
    training_overrides,
)
from lora_ops.config import LoraSpec, TrainConfig

TRAINING_COMMANDS = {"customers add", "customers update", "pipeline run", "train"}
# Options named like a TrainConfig field that configure something else.
NOT_TRAINING = {("data validate", "max_seq_len")}  # the data check's own limit


def commands(group: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    for name, command in group.commands.items():
        here = f"{path} {name}".strip()
        if hasattr(command, "commands"):
            yield from commands(command, here)
        else:
            yield here, command


def looks_like_training(name: str) -> bool:
    table = {option.name for option in TRAINING_OPTIONS}
    fields = set(TrainConfig.model_fields) | {f.name for f in dataclasses.fields(LoraSpec)}
    return name in table | fields


def shape(param: Any) -> tuple[Any, ...]:
    """What a user sees of an option, its default aside: flags, help and value type."""
    annotation = param.type_descriptor.annotation
    value_types = set(typing.get_args(annotation) or (annotation,)) - {type(None)}
    return param.opts, param.secondary_opts, param.help, param.is_flag, value_types


def test_every_command_with_a_training_option_takes_the_whole_table_alike() -> None:
    seen: dict[str, list[Any]] = {}
    for path, command in commands(typer.main.get_command(app)):
        training = [
            p
            for p in command.params
            if looks_like_training(p.name) and (path, p.name) not in NOT_TRAINING
        ]
        if training:
            seen[path] = training
    assert set(seen) == TRAINING_COMMANDS
    for path, params in seen.items():
        assert [p.name for p in params] == [option.name for option in TRAINING_OPTIONS], path
        for param, option in zip(params, TRAINING_OPTIONS, strict=True):
            flags = [option.flag.split("/")[0], *([option.short] if option.short else [])]
            assert param.opts == flags, path
            assert param.help == option.help, path
            assert param.default == (option.default if path == "train" else None), path
    first, *others = sorted(TRAINING_COMMANDS)
    for path in others:
        assert [shape(p) for p in seen[path]] == [shape(p) for p in seen[first]], path


def test_train_defaults_are_train_config_defaults() -> None:
    defaults = {option.name: option.default for option in TRAINING_OPTIONS}
    assert train_config(training_overrides(**defaults)) == TrainConfig()


@pytest.mark.parametrize("option", TRAINING_OPTIONS, ids=lambda option: option.flag)
def test_each_option_names_a_train_config_field(option: TrainingOption) -> None:
    node: Any = TrainConfig()
    for part in option.field.split("."):
        assert hasattr(node, part), option.field
        node = getattr(node, part)


def test_training_overrides_nest_like_train_config() -> None:
    assert training_overrides(rank=8, alpha=None, lr=0.1, target_modules="q_proj, v_proj") == {
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "learning_rate": 0.1,
    }


def test_a_row_added_to_the_table_reaches_a_decorated_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decay = TrainingOption("--weight-decay", "weight_decay", float, 0.0, "AdamW weight decay.")
    monkeypatch.setattr(options, "TRAINING_OPTIONS", (*TRAINING_OPTIONS, decay))
    received: list[TrainingOverrides] = []
    toy = typer.Typer()

    @toy.command()
    @training_options()
    def record(name: str, *, training: TrainingOverrides) -> None:
        received.append(training)

    runner = CliRunner()
    assert "--weight-decay" in runner.invoke(toy, ["--help"]).output
    given = runner.invoke(toy, ["acme", "--weight-decay", "0.1", "--rank", "4"])
    assert given.exit_code == 0, given.output
    not_given = runner.invoke(toy, ["acme"])
    assert not_given.exit_code == 0, not_given.output
    assert received == [{"weight_decay": 0.1, "lora": {"r": 4}}, {}]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--epochs", "auto"], {"epochs": "auto"}),
        (["--epochs", "4"], {"epochs": 4}),
        (
            ["--eval-every", "10", "--early-stopping-patience", "3"],
            {"eval_every": 10, "early_stopping_patience": 3},
        ),
        (["--warm-start", "production"], {"warm_start": "production"}),
    ],
)
def test_steering_options_become_overrides(argv: list[str], expected: dict[str, Any]) -> None:
    received: list[TrainingOverrides] = []
    toy = typer.Typer()

    @toy.command()
    @training_options()
    def record(name: str, *, training: TrainingOverrides) -> None:
        received.append(training)

    result = CliRunner().invoke(toy, ["acme", *argv])
    assert result.exit_code == 0, result.output
    assert received == [expected]
    train_config(received[0])  # and TrainConfig takes them


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": "many"}, "epochs: must be a whole number of passes from 1 to 1000, or 'auto'"),
        ({"early_stopping_patience": 2}, "early_stopping_patience: counts held-out evaluations"),
        ({"eval_every": 0}, "eval_every: Input should be greater than or equal to 1"),
        ({"warm_start": "latest"}, "warm_start: the only adapter a retrain can start from"),
    ],
)
def test_bad_steering_options_are_refused_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    from lora_ops.errors import InputError

    with pytest.raises(InputError) as refused:
        train_config(overrides)
    assert message in str(refused.value)
