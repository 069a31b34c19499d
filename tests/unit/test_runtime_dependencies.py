"""What `pip install .` brings is enough to run lora-ops: no runtime path may lean on a
package that only the test extra (or anything else in the dev virtualenv) installs.

The check builds a real virtualenv that holds exactly the closure of ``[project]
dependencies`` (each distribution linked from this environment's site-packages, so no
download) and imports every module of the package in it.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import pkgutil
import subprocess
import sys
import tomllib
import venv
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
PACKAGES = ("lora_ops", "flows")
# `python -m venv` puts these in every virtualenv.
VENV_DEFAULTS = ("pip", "setuptools")
# Not libraries: Alembic's environment runs only under `alembic upgrade`, and importing
# __main__ runs the CLI (checked on its own below).
NOT_IMPORTABLE = {"lora_ops.migrations.env", "lora_ops.__main__", "lora_ops.cli.__main__"}


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution those requirements pull in, by canonical name, extras followed."""
    seen: dict[str, set[str]] = {}
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for text in metadata.distribution(name).requires or []:
            child = Requirement(text)
            wanted_for = {"", *extras}
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted_for):
                todo.append(child)
    return set(seen)


def top_level_entries(name: str) -> set[str]:
    """The names a distribution puts directly into site-packages (packages, modules,
    .dist-info, .libs folders, .pth files)."""
    files = metadata.distribution(name).files or []
    return {f.parts[0] for f in files if f.parts and f.parts[0] != ".."}


@cache
def runtime_venv(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    source = Path(metadata.distribution("torch").locate_file(""))
    wanted = closure(declared()) | {canonicalize_name(n) for n in VENV_DEFAULTS}
    wanted.discard(canonicalize_name("lora-ops"))
    for name in sorted(wanted):
        for entry in top_level_entries(name):
            target = site / entry
            if (source / entry).exists() and not target.exists():
                target.symlink_to(source / entry)
    for package in PACKAGES:  # what `pip install .` installs of the project itself
        (site / package).symlink_to(ROOT / package)
    return python


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        found.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if info.name not in NOT_IMPORTABLE:
                found.append(info.name)
    return found


def third_party_imports() -> set[str]:
    """Top-level names the package's sources import that are neither its own nor stdlib."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def test_every_module_imported_directly_is_a_declared_dependency() -> None:
    providers = metadata.packages_distributions()
    direct = {canonicalize_name(r.name) for r in declared()}
    undeclared = {
        name: providers.get(name, ["?"])
        for name in sorted(third_party_imports())
        if not {canonicalize_name(d) for d in providers.get(name, [])} & direct
    }
    assert undeclared == {}, f"imported but not in [project] dependencies: {undeclared}"


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runtime_venv(tmp_path_factory.mktemp("runtime") / "venv")


def test_every_module_imports_with_the_runtime_dependencies_alone(python: Path) -> None:
    names = modules()
    assert "lora_ops.serving.app" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "import transformers.utils as u\n"
        "# Loading a GGUF base (SmolLM2) needs both; transformers says so only at load time.\n"
        "assert u.is_gguf_available() and u.is_accelerate_available(), 'GGUF loading'\n"
        "import importlib.util as iu\n"
        "assert iu.find_spec('peft') is None, 'the test extra leaked into the venv'\n"
        "print('imported', len(sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd="/"
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.startswith("imported")


def test_the_cli_starts_with_the_runtime_dependencies_alone(python: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    for command in (["--help"], ["base", "list"], ["serve", "--help"], ["worker", "--help"]):
        done = subprocess.run(
            [str(python), "-m", "lora_ops", *command],
            capture_output=True, text=True, timeout=300, env=env, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
