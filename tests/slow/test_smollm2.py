"""The real base, SmolLM2-135M-Instruct: conversion, PEFT parity and learning the sample data.

These load the real model (converted from the GGUF once, ~30 s) and train it for a
minute on the CPU; they are where the real model is the point.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_ops import base_models, data
from lora_ops.config import TrainConfig
from lora_ops.files import sha256_file
from lora_ops.generation import generate_reply
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora, load_adapter, save_adapter
from lora_ops.training import TrainingJob, train_adapter
from tests.helpers import randomize_adapter, sample_input_ids

pytestmark = pytest.mark.slow
SAMPLE = Path(__file__).parents[2] / "examples" / "acme-support.jsonl"


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_converted_model_is_the_real_pretrained_one(smollm2_base: Path) -> None:
    manifest_sha = base_models.base_sha256(smollm2_base)
    assert manifest_sha == sha256_file(smollm2_base / "model.safetensors")
    model = base_models.load_model(smollm2_base, "cpu")
    tokenizer = base_models.load_tokenizer(smollm2_base)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    reply = generate_reply(
        model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}], 16
    )
    assert "Paris" in reply


def test_adapters_match_peft_both_ways_on_smollm2(smollm2_base: Path, tmp_path: Path) -> None:
    ids = sample_input_ids(49152, batch=2, seq=16)
    ours_model = base_models.load_model(smollm2_base, "cpu")
    apply_lora(ours_model, LoraSpec(r=16, alpha=32))
    randomize_adapter(ours_model, "default", seed=11, std=0.02)
    save_adapter(ours_model, tmp_path / "ours", base_model_name_or_path="smollm2-135m-instruct")
    with adapters_in_use(ours_model, "default"):
        ours = logits(ours_model, ids)
    del ours_model
    peft_model = PeftModel.from_pretrained(
        base_models.load_model(smollm2_base, "cpu"), tmp_path / "ours"
    )
    assert (logits(peft_model, ids) - ours).abs().max().item() <= 1e-4
    del peft_model

    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base_models.load_model(smollm2_base, "cpu"), peft_config)
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = logits(peft_model, ids)
    del peft_model
    model = base_models.load_model(smollm2_base, "cpu")
    load_adapter(model, tmp_path / "peft", adapter="acme")
    with adapters_in_use(model, "acme"):
        assert (logits(model, ids) - theirs).abs().max().item() <= 1e-4


@pytest.mark.long  # ~90 s of SmolLM2 training; make demo trains it too
def test_training_on_the_sample_data_beats_the_base(smollm2_base: Path, tmp_path: Path) -> None:
    tokenizer = base_models.load_tokenizer(smollm2_base)
    dataset = data.prepare_dataset(SAMPLE, tokenizer, max_seq_len=256, eval_fraction=0.1)
    config = TrainConfig(
        lora=LoraSpec(r=16, alpha=32), learning_rate=2e-3, max_steps=12, batch_size=8, seed=0
    )
    model = base_models.load_model(smollm2_base, "cpu")
    job = TrainingJob(
        model=model,
        train_examples=dataset.train,
        eval_examples=dataset.eval,
        config=config,
        out_dir=tmp_path,
        pad_id=tokenizer.pad_token_id,
        progress=False,
    )
    result = train_adapter(job)
    # The base has never seen Acme's answer format or facts; 12 steps teach the format.
    assert result.base_eval_loss > 3.0
    assert result.eval_loss < 0.6 * result.base_eval_loss
