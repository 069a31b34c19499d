"""The tree stays readable: modules a reader can take in, functions a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# A command's options and help are its body; the migrations are Alembic's generated shape.
FUNCTION_LENGTH_EXEMPT = ("lora_ops/cli/", "lora_ops/migrations/")


def sources() -> list[Path]:
    return sorted([*ROOT.glob("lora_ops/**/*.py"), *ROOT.glob("flows/**/*.py")])


def test_no_module_is_longer_than_a_reader_takes_in() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in sources()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_no_function_is_longer_than_a_reader_holds() -> None:
    long: dict[str, int] = {}
    for path in sources():
        where = str(path.relative_to(ROOT))
        if where.startswith(FUNCTION_LENGTH_EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{where}:{node.lineno} {node.name}"] = length
    assert long == {}, f"reshape these functions (over {MAX_FUNCTION_LINES} lines): {long}"


def test_the_layout_checks_look_at_the_whole_package() -> None:
    found = {str(path.relative_to(ROOT)) for path in sources()}
    assert {"lora_ops/lora/layer.py", "flows/retrain.py", "lora_ops/serving/engine.py"} <= found
