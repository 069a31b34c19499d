"""Batched decoding where every row has its own adapter, sampling settings and stop rules.

Rows are left-padded so all prompts end at the same position; position ids come from the
attention mask, so a padded row computes what it would alone. The base matmuls are shared
by the batch; each adapter's low-rank update runs on its own rows (``set_row_adapters``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lora_ops.base_models import autocast_for
from lora_ops.errors import InputError
from lora_ops.lora import adapters_in_use

# Dividing logits by a temperature this small overflows to inf (then NaN probabilities);
# the distribution it asks for is the argmax anyway. vLLM draws the same line.
GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded: greedy when ``temperature`` is 0.

    ``logprobs``: None for none; k >= 0 for each generated token's log probability and
    the k likeliest alternatives. Log probabilities are the model's own distribution
    (vLLM's default), before penalties, biases, a grammar's mask or the temperature.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (or a stop string), as vLLM's flag does
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 4096:
            raise InputError("must be between 1 and 4096", field="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InputError("must be between 0 and 2", field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("must be in (0, 1]", field="top_p")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InputError("at most 4 non-empty strings", field="stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"must be between 0 and {MAX_TOP_LOGPROBS}", field="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InputError("must be between -2 and 2", field=name)
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise InputError("biases must be between -100 and 100", field="logit_bias")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability, and the likeliest tokens at its place."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), likeliest first


class TokenConstraint(Protocol):
    """What a row may generate next (a grammar), consulted before every pick."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token that may not come next to -inf, in place."""

    def accept(self, token: int) -> None:
        """Advance past ``token``, which the last mask allowed."""

    def finished(self) -> bool:
        """Nothing may follow what was accepted: the row ends here."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: TokenConstraint | None = None  # one per row: it keeps the row's parse state


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


@dataclass(frozen=True)
class Delta:
    """What a streaming listener hears after a step: new text, and its tokens' logprobs."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


TokenCallback = Callable[[int, str], None]  # (row, newly decoded text)


class DecodingRow:
    """Decoding state of one request: what it generated, its sampler, whether it is done."""

    def __init__(self, request: GenerationRequest, device: torch.device) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = None
        if request.params.logprobs is not None:
            self.logprobs = []
        self.reported = 0  # tokens whose logprobs a listener has heard
        self._counts: torch.Tensor | None = None  # generated tokens by id, for penalties
        self.generator: torch.Generator | None = None
        if request.params.temperature >= GREEDY_BELOW:
            self.generator = torch.Generator(device=device)
            seed = request.params.seed
            # torch takes seeds in [-2**63, 2**64); any other integer folds into that range.
            seed = seed % 2**64 if seed is not None else torch.seed()
            self.generator.manual_seed(seed)

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits sampled from: biases and penalties added, the grammar's mask applied."""
        params = self.request.params
        penalised = params.presence_penalty or params.frequency_penalty
        if not (params.logit_bias or penalised or self.request.constraint):
            return logits
        logits = logits.float().clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        if penalised and self._counts is not None:
            counts = self._counts
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if self.request.constraint is not None:
            self.request.constraint.mask(logits)
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        params = self.request.params
        if params.temperature < GREEDY_BELOW:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the likeliest
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(
        self, logits: torch.Tensor, eos: set[int | None], tokenizer: PreTrainedTokenizerBase
    ) -> tuple[int, str]:
        """Pick the next token from ``logits``; return it and the text it completed.

        The text is empty while a partial UTF-8 character waits for its other bytes, and
        once the row has finished (then the token is only padding).
        """
        if self.finish_reason:
            return int(tokenizer.pad_token_id), ""
        token = self.pick(self.adjusted(logits))
        params = self.request.params
        constraint = self.request.constraint
        if token in eos and not params.ignore_eos:
            self.finish_reason = "stop"
            return token, ""
        self._record(token, logits)
        if constraint is not None:
            constraint.accept(token)
        # One flat list of ids decodes to one string; the list[str] branch is for batches.
        text = cast(str, tokenizer.decode(self.tokens, skip_special_tokens=True))
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop"
        elif constraint is not None and constraint.finished():
            self.finish_reason = "stop"
        elif len(self.tokens) >= params.max_tokens:
            self.finish_reason = "length"
        # A partial UTF-8 character decodes as U+FFFD: hold it back until it is whole.
        whole = not text.endswith("\ufffd") or self.finish_reason is not None
        if not whole:
            return token, ""
        piece = text[len(self.text) :] if len(text) > len(self.text) else ""
        self.text = text
        return token, piece

    def _record(self, token: int, logits: torch.Tensor) -> None:
        self.tokens.append(token)
        params = self.request.params
        if params.presence_penalty or params.frequency_penalty:
            if self._counts is None:
                self._counts = torch.zeros(logits.shape[-1], device=logits.device)
            self._counts[token] += 1
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
            alternatives = (
                tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
            )
            self.logprobs.append(TokenLogprob(token, float(logprobs[token]), alternatives))

    def delta(self, piece: str) -> Delta:
        """``piece`` with the logprobs of the tokens generated since the last delta."""
        if self.logprobs is None:
            return Delta(piece)
        new = tuple(self.logprobs[self.reported :])
        self.reported = len(self.logprobs)
        return Delta(piece, new)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=self.tokens,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.request.prompt_ids),
            logprobs=self.logprobs,
        )


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[GenerationRequest],
    on_text: TokenCallback | None = None,
) -> list[GenerationResult]:
    """Decode every request in one batch, each through its own adapter (or the base)."""
    device = next(model.parameters()).device
    rows = [DecodingRow(r, device) for r in requests]
    input_ids, attention_mask = _left_pad([r.prompt_ids for r in requests], tokenizer, device)
    eos = end_ids(model, tokenizer)
    cache = DynamicCache()
    step_ids = input_ids
    with torch.no_grad(), adapters_in_use(model, [r.adapter for r in requests]):
        for _ in range(max(r.params.max_tokens for r in requests)):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            with autocast_for(device):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    # Only the last position is sampled from: projecting every prompt
                    # position onto the vocabulary would cost more than the prompt itself.
                    logits_to_keep=1,
                )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]  # (batch, vocab)
            next_ids = []
            for i, row in enumerate(rows):
                token, piece = row.advance(logits[i], eos, tokenizer)
                next_ids.append(token)
                if piece and on_text is not None:
                    on_text(i, piece)
            if all(row.finish_reason for row in rows):
                break
            step_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], 1)
    return [row.result() for row in rows]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[int]:
    """A chat's prompt ids with the assistant turn opened, as every decoder here renders it."""
    encoded = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    # return_dict=True gives a BatchEncoding; the declared return type is a union of every mode.
    return list(cast(Mapping[str, list[int]], encoded)["input_ids"])


def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_new_tokens: int = 64,
    adapter: str | None = None,
) -> str:
    """The greedy assistant reply to a chat through ``adapter`` (None: the base), rendered
    with the model's chat template: one row of the replica's decoder, so evaluation, the
    pyfunc, `lora-ops generate` and the replica answer alike."""
    request = GenerationRequest(
        encode_chat(tokenizer, messages), adapter, SamplingParams(max_tokens=max_new_tokens)
    )
    (result,) = generate_batch(model, tokenizer, [request])
    return result.text.strip()


def end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int | None]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    extra = configured if isinstance(configured, list) else [configured]
    return {tokenizer.eos_token_id, *extra} - {None}


def _left_pad(
    prompts: Sequence[list[int]], tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if any(not p for p in prompts):
        raise InputError("a prompt must hold at least one token", field="prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)
