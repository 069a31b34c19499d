"""The pyfunc's input handling: every form MLflow hands ``predict`` becomes a list of prompts."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from lora_ops.adapter_pyfunc import prompts_of


@pytest.mark.parametrize(
    ("model_input", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        ("a", ["a"]),
        ({"prompt": ["a", "b"]}, ["a", "b"]),
        (pd.DataFrame({"prompt": ["a"]}), ["a"]),
        (pd.DataFrame({0: ["a", "b"]}), ["a", "b"]),
        (pd.DataFrame({"prompt": [["a", "b"]]}), ["a", "b"]),
    ],
    ids=["list", "str", "dict", "frame", "unnamed-column", "frame-of-list"],
)
def test_prompts_of_every_input_form(model_input: Any, expected: list[str]) -> None:
    assert prompts_of(model_input) == expected
