"""Tool-calling data through the command line on tiny-llama: checked, then trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_ops import data
from lora_ops.cli import app

TOOL_SAMPLE = Path(__file__).parents[2] / "examples" / "weather-tools.jsonl"
runner = CliRunner()


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's first 20 lines: single calls, parallel calls and a weight-0 greeting."""
    path = tmp_path_factory.mktemp("tools") / "weather.jsonl"
    path.write_text("".join(TOOL_SAMPLE.read_text().splitlines(keepends=True)[:20]))
    return path


def test_the_tool_sample_holds_every_kind_of_turn(tool_data: Path) -> None:
    examples = data.read_examples(tool_data)

    assert all(e.tools for e in examples)
    assert any(len(m.get("tool_calls", [])) == 2 for e in examples for m in e.messages)
    assert any(m.get("weight") == 0 for e in examples for m in e.messages)
    assert any(m["role"] == "tool" for e in examples for m in e.messages)


def test_data_validate_passes_a_tool_calling_file(tool_data: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(tool_data), "--base", "tiny-llama"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["examples"], summary["problems"], summary["too_long"]) == (20, 0, 0)


def test_data_validate_names_the_line_and_field_of_a_bad_call(
    tool_data: Path, tmp_path: Path
) -> None:
    lines = tool_data.read_text().splitlines()
    lines[3] = lines[3].replace(
        '"name": "get_weather", "arguments"', '"name": "get_time", "arguments"'
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")

    result = runner.invoke(app, ["data", "validate", str(bad)])

    assert result.exit_code == 1
    assert f"{bad}:4: messages[2].tool_calls[0].function.name: calls 'get_time'" in result.output


def test_train_on_tool_calls_writes_an_adapter(tool_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["train", "--base", "tiny-llama", "--data", str(tool_data), "--out", str(out)]
    options = ["--rank", "4", "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "512"]
    result = runner.invoke(app, [*args, *options, "--target-modules", "q_proj,v_proj"])

    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert "adapted eval loss" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
