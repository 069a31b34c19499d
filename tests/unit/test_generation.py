"""The one-row reply (evaluation, the pyfunc, `lora-ops generate`) is a call of the
replica's batched decoder, and answers as transformers' own greedy generate does."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_ops.generation import encode_chat, generate_reply
from lora_ops.lora import LoraSpec, adapters_in_use, apply_lora
from tests.helpers import randomize_adapter

PROMPTS = ["How much is the Pro Anvil?", "Can I return an anvil?", "What is the Anvil Club?"]


def transformers_greedy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int
) -> str:
    ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    input_ids = torch.tensor([ids])
    eos = [tokenizer.eos_token_id, model.generation_config.eos_token_id]
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted({e for e in eos if isinstance(e, int)}),
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()


@pytest.mark.parametrize("adapter", [None, "acme"])
def test_the_reply_is_what_transformers_generates(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, adapter: str | None
) -> None:
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8), adapter="acme")
    randomize_adapter(tiny_model, "acme", seed=3, std=0.3)
    for prompt in PROMPTS:
        with adapters_in_use(tiny_model, adapter):
            expected = transformers_greedy(tiny_model, tiny_tokenizer, prompt, 24)
        messages = [{"role": "user", "content": prompt}]
        assert generate_reply(tiny_model, tiny_tokenizer, messages, 24, adapter) == expected


def test_the_reply_goes_through_the_named_adapter(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    apply_lora(tiny_model, LoraSpec(r=4, alpha=8), adapter="acme")
    randomize_adapter(tiny_model, "acme", seed=3, std=0.3)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    base = generate_reply(tiny_model, tiny_tokenizer, messages, 24)
    adapted = generate_reply(tiny_model, tiny_tokenizer, messages, 24, "acme")
    assert adapted != base
    assert generate_reply(tiny_model, tiny_tokenizer, messages, 24) == base  # routing reset


def test_biases_and_penalties_shape_the_logits_a_row_samples_from() -> None:
    from lora_ops.generation import DecodingRow, GenerationRequest, SamplingParams

    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 10.0), (4, -100.0))
    )
    row = DecodingRow(GenerationRequest([1], None, params), torch.device("cpu"))
    logits = torch.zeros(8)
    for token in (2, 2, 5):
        row._record(token, logits)
    adjusted = row.adjusted(logits)
    expected = torch.tensor([0, 0, -0.5 - 0.5, 10, -100, -0.5 - 0.25, 0, 0])
    assert torch.allclose(adjusted, expected)
    assert torch.equal(logits, torch.zeros(8))  # the model's logits are left alone


def test_a_row_that_asks_for_logprobs_gets_them_for_each_token() -> None:
    from lora_ops.generation import DecodingRow, GenerationRequest, SamplingParams

    row = DecodingRow(GenerationRequest([1], None, SamplingParams(logprobs=2)), torch.device("cpu"))
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    row._record(2, logits)
    (entry,) = row.logprobs or []
    expected = torch.log_softmax(logits, dim=-1)
    assert entry.token == 2
    assert entry.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in entry.top] == [1, 2]
    assert row.delta("x").logprobs == (entry,)
    assert row.delta("y").logprobs == ()
