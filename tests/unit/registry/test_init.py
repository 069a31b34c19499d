"""The package's public names: each one loads from its module, none loads MLflow early."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lora_ops.registry as package


@pytest.mark.parametrize("name", package.__all__)
def test_every_public_name_comes_from_its_module(name: str) -> None:
    home = importlib.import_module(f"lora_ops.registry.{package._HOMES[name]}")
    assert getattr(package, name) is getattr(home, name)


def test_unknown_names_are_attribute_errors() -> None:
    assert sorted(package._HOMES) == sorted(package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = package.Nothing  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_mlflow() -> None:
    code = "import sys, lora_ops.registry; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
