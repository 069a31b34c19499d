"""The lora-ops command line end to end on tiny-llama: what a user types and sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lora_ops import base_models
from lora_ops.cli import app
from lora_ops.lora import adapters_in_use, load_adapter

SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"
runner = CliRunner()


def lora_ops(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real console script, as a user would."""
    return subprocess.run(
        [sys.executable, "-c", "from lora_ops.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acme.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def trained(tiny_base: Path, small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    result = runner.invoke(
        app,
        [
            "train",
            "--base",
            "tiny-llama",
            "--data",
            str(small_data),
            "--out",
            str(out),
            "--rank",
            "4",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--target-modules",
            "q_proj,v_proj",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert "adapted eval loss" in result.output
    return out


def test_base_import_prints_the_folder_last(tiny_base: Path) -> None:
    result = runner.invoke(app, ["base", "import", "tiny-llama"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(tiny_base)
    listing = runner.invoke(app, ["base", "list"])
    assert "tiny-llama" in listing.output
    assert "smollm2-135m" in listing.output


def test_data_validate_reports_a_good_file(small_data: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(small_data), "--base", "tiny-llama"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["examples"] == 24
    assert summary["tokens_max"] >= summary["tokens_median"] >= summary["tokens_min"] > 0


def test_data_validate_lists_every_problem_with_its_line(tmp_path: Path, small_data: Path) -> None:
    lines = small_data.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "robot", "content": "hi"}]}'
    lines[5] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = lora_ops("data", "validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3:" in result.stderr
    assert "robot" in result.stderr
    assert f"{bad}:6:" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_user_error_is_one_line_and_exit_2(small_data: Path, tmp_path: Path) -> None:
    result = lora_ops(
        "train", "--base", "gpt-17", "--data", str(small_data), "--out", str(tmp_path)
    )
    assert result.returncode == 2
    assert (
        "error: base: unknown base model 'gpt-17'" in result.stderr
        or "error: base:" in result.stderr
    )
    assert "Traceback" not in result.stderr
    bad_rank = lora_ops(
        "train",
        "--base",
        "tiny-llama",
        "--data",
        str(small_data),
        "--out",
        str(tmp_path),
        "--rank",
        "0",
    )
    assert bad_rank.returncode == 2
    assert "r: must be a whole number >= 1" in bad_rank.stderr
    assert not any(tmp_path.iterdir())


def test_train_writes_a_peft_adapter(trained: Path) -> None:
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama"


def test_merge_writes_a_plain_model_with_the_adapters_logits(
    trained: Path, tiny_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", "--base", "tiny-llama", "--adapter", str(trained), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = base_models.load_model(tiny_base, "cpu")
    load_adapter(adapted, trained)
    ids = torch.arange(5, 25).reshape(2, 10)
    with torch.no_grad(), adapters_in_use(adapted, "default"):
        expected = adapted(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()
    again = lora_ops("merge", "--base", "tiny-llama", "--adapter", str(trained), "--out", str(out))
    assert again.returncode == 2
    assert "not empty" in again.stderr


def test_generate_with_and_without_adapter(trained: Path) -> None:
    args = ["generate", "--base", "tiny-llama", "--prompt", "Hi", "--max-new-tokens", "5"]
    base = runner.invoke(app, args)
    adapted = runner.invoke(app, [*args, "--adapter", str(trained)])
    assert base.exit_code == 0, base.output
    assert adapted.exit_code == 0, adapted.output
    assert base.output.strip()


def test_a_broken_file_is_reported_without_loading_a_model(tmp_path: Path) -> None:
    # Structure needs no tokenizer: the answer must not wait for torch and transformers.
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n\n')
    code = (
        "import sys\n"
        "from lora_ops.cli import main\n"
        f"sys.argv = ['lora-ops', 'data', 'validate', {str(bad)!r}, '--base', 'tiny-llama']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = sorted({'torch', 'transformers', 'mlflow', 'prefect'} & set(sys.modules))\n"
        "print(code, heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert f"{bad}:2:" in done.stderr
    assert done.stderr.strip().endswith("1 []"), done.stderr
