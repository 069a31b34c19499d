"""The README's configuration table names every setting lora-ops reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices

from lora_ops.settings import Settings

README = Path(__file__).parents[2] / "README.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variables = alias.choices if isinstance(alias, AliasChoices) else [f"LORA_OPS_{name}"]
        if not any(f"`{str(variable).upper()}`" in table for variable in variables):
            missing.append(name)
    assert missing == []
