"""Tiny random causal LMs of several architectures, built from transformers configs.

Each is hidden 64, 2 layers, with tiny-llama's tokenizer (so chat templates and the data
pipeline work unchanged); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from lora_ops import base_models

# Keyword arguments of the llama-like configs (their field names agree).
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _gpt2(tokens: dict[str, Any]) -> PretrainedConfig:
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **tokens)


def _gpt_neox(tokens: dict[str, Any]) -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **tokens,
    )


def _phi3(tokens: dict[str, Any]) -> PretrainedConfig:
    # Phi-3 checks pad_token_id < vocab_size and has no sliding window by default.
    return Phi3Config(**_LLAMA_LIKE, **tokens)


def _gemma2(tokens: dict[str, Any]) -> PretrainedConfig:
    return Gemma2Config(**_LLAMA_LIKE, head_dim=16, sliding_window=64, **tokens)


def _qwen3(tokens: dict[str, Any]) -> PretrainedConfig:
    return Qwen3Config(**_LLAMA_LIKE, head_dim=16, **tokens)


CONFIGS: dict[str, Callable[[dict[str, Any]], PretrainedConfig]] = {
    "llama": lambda tokens: LlamaConfig(**_LLAMA_LIKE, **tokens),
    "qwen2": lambda tokens: Qwen2Config(**_LLAMA_LIKE, **tokens),
    "qwen3": _qwen3,
    "mistral": lambda tokens: MistralConfig(**_LLAMA_LIKE, **tokens),
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "olmo2": lambda tokens: Olmo2Config(**_LLAMA_LIKE, **tokens),
}


def build_base(model_type: str, folder: Path, seed: int = 7) -> Path:
    """Save a tiny random ``model_type`` model and tiny-llama's tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM

    tokenizer = base_models.load_tokenizer("tiny-llama")
    tokens = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    config = CONFIGS[model_type](tokens)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
