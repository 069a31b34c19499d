"""The base-model catalogue: deterministic tiny-llama, names and folders, atomic import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_ops import base_models
from lora_ops.errors import InputError
from lora_ops.files import sha256_file


def test_tiny_llama_is_the_same_bytes_every_time(tiny_base: Path, tmp_path: Path) -> None:
    again = base_models.import_base("tiny-llama", cache_dir=tmp_path)
    assert again == tmp_path / "models" / "tiny-llama"
    assert base_models.base_sha256(again) == base_models.base_sha256(tiny_base)
    assert sha256_file(again / "model.safetensors") == base_models.base_sha256(again)
    manifest = json.loads((again / base_models.MANIFEST).read_text())
    assert manifest["name"] == "tiny-llama"
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]


def test_tiny_llama_has_a_chat_template_and_a_small_model(tiny_base: Path) -> None:
    tokenizer = base_models.load_tokenizer(tiny_base)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
    model = base_models.load_model("tiny-llama", "cpu")
    assert model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert torch.all(torch.isfinite(next(model.parameters())))


def test_local_folder_is_accepted_wherever_a_name_is(tiny_base: Path) -> None:
    assert base_models.resolve_base(str(tiny_base)) == tiny_base.resolve()
    assert base_models.base_name(tiny_base) == "tiny-llama"


@pytest.mark.parametrize("name", ["gpt-17", "../tiny-llama", "", "/nonexistent/folder"])
def test_unknown_base_is_refused_with_the_catalogue(name: str) -> None:
    with pytest.raises(InputError, match="smollm2-135m-instruct, tiny-llama") as info:
        base_models.resolve_base(name)
    assert info.value.field == "base"


def test_list_shows_size_and_state(tiny_base: Path, tmp_path: Path) -> None:
    rows = {row["name"]: row for row in base_models.list_bases()}
    assert rows["tiny-llama"]["materialised"] is True
    assert rows["tiny-llama"]["size_bytes"] == (tiny_base / "model.safetensors").stat().st_size
    empty = {row["name"]: row for row in base_models.list_bases(cache_dir=tmp_path)}
    assert empty["smollm2-135m-instruct"]["materialised"] is False


def test_half_written_folder_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # left by a crash: no weights, no manifest
    rebuilt = base_models.import_base("tiny-llama", cache_dir=tmp_path)
    assert base_models.is_materialised(rebuilt)
