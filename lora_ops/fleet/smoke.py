"""The smoke test of a deployed adapter: one fixed prompt, greedy, compared with the answer
recorded when the version was registered."""

from __future__ import annotations

from pathlib import Path

SMOKE_MESSAGES = [{"role": "user", "content": "Hello! What can you help me with?"}]
SMOKE_MAX_TOKENS = 16


def smoke_reply(base: str, adapter_dir: Path) -> str:
    """What the adapter answers to the smoke prompt, decoded as a replica decodes it."""
    # torch and transformers load here, not at import: the fleet client needs only the
    # prompt above, and `from lora_ops.fleet import Fleet` must not pay seconds for a model.
    from lora_ops import base_models
    from lora_ops.generation import GenerationRequest, SamplingParams, encode_chat, generate_batch
    from lora_ops.lora import load_adapter

    tokenizer = base_models.load_tokenizer(base)
    model = base_models.load_model(base)
    load_adapter(model, adapter_dir, "smoke")
    prompt = encode_chat(tokenizer, SMOKE_MESSAGES)
    request = GenerationRequest(prompt, "smoke", SamplingParams(max_tokens=SMOKE_MAX_TOKENS))
    return generate_batch(model, tokenizer, [request])[0].text
