"""The fleet package's names: the client at once, the rollout on first use."""

from __future__ import annotations

import subprocess
import sys

import lora_ops.fleet
from lora_ops.fleet import client, rollout, smoke


def test_the_fleet_client_imports_without_torch_or_mlflow() -> None:
    # The CLI's fleet commands and the stack import Fleet; a model library would cost seconds.
    code = (
        "import sys\n"
        "from lora_ops.fleet import SMOKE_MESSAGES, Fleet, check_url\n"
        "print(sorted({'torch', 'transformers', 'mlflow'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_every_public_name_of_the_fleet_is_the_one_its_module_defines() -> None:
    # In import order: rollout imports from client and smoke, so the first match is the home.
    homes = (client, smoke, rollout)
    for name in lora_ops.fleet.__all__:
        home = next(module for module in homes if name in vars(module))
        assert getattr(lora_ops.fleet, name) is getattr(home, name), name


def test_an_unknown_fleet_name_is_an_attribute_error() -> None:
    # hasattr swallows AttributeError alone: anything else __getattr__ raised would fail here.
    assert not hasattr(lora_ops.fleet, "deployment")
    assert not hasattr(lora_ops.fleet, "_ROLLOUT")
