"""PEFT's mixed-adapter inference in static batches: the library baseline, not the product.

What a team would run instead of a serving engine: the base loaded with transformers,
wrapped in ``peft.PeftModel`` with every adapter loaded by name, and each batch decoded by
one ``generate(..., adapter_names=[...])`` call. Requests that arrive within
``batch_window_s`` of the first (at most ``max_batch_size``) form a static batch: nobody
joins it once it has started, and rows that finished early keep their place until its
longest row is done. It serves the same ``submit`` protocol as the engines, so the
drivers in bench/workload.py measure it beside them. Greedy decoding only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lora_ops import base_models
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.generation import (
    GenerationResult,
    SamplingParams,
    TokenCallback,
    encode_chat,
    end_ids,
)
from lora_ops.serving.cache import UnknownModel

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"
PEFT_BASE_ROW = "__base__"  # what PEFT's adapter_names calls a row without an adapter
__all__ = ["PeftStaticConfig", "PeftStaticEngine"]


@dataclass(frozen=True)
class PeftStaticConfig:
    """The base, the adapters it serves by name, and how a static batch is gathered.

    Args:
        base: catalogue name or transformers folder of the base model.
        adapters: adapter name -> folder of a PEFT adapter for this base.
        max_batch_size: most requests decoded in one ``generate`` call.
        batch_window_s: how long the first request of a batch waits for company.
        device: where the model runs (default: CUDA when there is one, else the CPU).
    """

    base: str | Path
    adapters: Mapping[str, Path]
    max_batch_size: int = 16
    batch_window_s: float = 0.05
    device: str | torch.device | None = None


@dataclass
class _Pending:
    prompt_ids: list[int]
    model: str
    params: SamplingParams
    future: Future[GenerationResult]
    on_text: TokenCallback | None


class _Row:
    """One request's share of a static batch: the tokens it keeps, its text, its end.

    The rules are the engine's (``lora_ops.generation.DecodingRow``), so both answer alike:
    an end-of-turn token ends the row unless ``ignore_eos``; a stop string cuts the text;
    a partial UTF-8 character is held back until it is whole.
    """

    def __init__(
        self, pending: _Pending, tokenizer: PreTrainedTokenizerBase, eos: set[int]
    ) -> None:
        self.pending = pending
        self.params = pending.params
        self.tokenizer = tokenizer
        self.eos = eos
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def take(self, token: int) -> None:
        """Keep ``token`` (the batch's next one for this row) and tell the listener."""
        if token in self.eos and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        text = cast(str, self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        cut = min((text.find(s) for s in self.params.stop if s in text), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        if text.endswith("\ufffd") and self.finish_reason is None:
            return
        piece = text[len(self.text) :] if len(text) > len(self.text) else ""
        self.text = text
        if piece:
            self._tell(piece)

    def _tell(self, piece: str) -> None:
        callback = self.pending.on_text
        if callback is None:
            return
        try:
            callback(0, piece)
        except Exception:  # a listener that went away must not fail its batch-mates
            log.debug("dropping a text listener", exc_info=True)
            self.pending.on_text = None

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=self.tokens,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.pending.prompt_ids),
        )


class _RowStreamer(BaseStreamer):
    """Hands each row its token the moment ``generate`` has picked it.

    ``generate`` calls ``put`` once with the prompts, then once per step with the batch's
    new tokens (one per row), so a row's first text reaches its listener as soon as its
    first token exists, not when the batch ends.
    """

    def __init__(self, rows: Sequence[_Row]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row.finish_reason is None:
                row.take(int(token))

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    """Which rows are done: at their own ``max_tokens``, or at end of turn unless ignored.

    ``generate``'s own end-of-turn check is switched off (it would end an ``ignore_eos``
    row too); this one decides row by row. The batch still runs until every row is done,
    as a static batch does. A stop string is seen one step late: the streamer decodes the
    text after this check has run for the same token.
    """

    def __init__(self, rows: Sequence[_Row], prompt_width: int, eos: set[int]) -> None:
        self.rows = rows
        self.prompt_width = prompt_width
        self.eos = eos

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        newest = input_ids[:, -1].tolist()
        done = [
            row.finish_reason is not None
            or generated >= row.params.max_tokens
            or (token in self.eos and not row.params.ignore_eos)
            for row, token in zip(self.rows, newest, strict=True)
        ]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


class PeftStaticEngine:
    """Serve a base and its PEFT adapters through ``generate``, one static batch at a time."""

    def __init__(self, config: PeftStaticConfig) -> None:
        if config.max_batch_size < 1 or config.batch_window_s < 0:
            raise InputError("max_batch_size must be >= 1 and batch_window_s >= 0")
        if not config.adapters:
            raise InputError("at least one adapter is needed to wrap the base", field="adapters")
        reserved = {BASE_MODEL_NAME, PEFT_BASE_ROW} & set(config.adapters)
        if reserved:
            raise InputError(f"{sorted(reserved)} name the base model", field="adapters")
        self.config = config
        self.device = torch.device(config.device) if config.device else base_models.default_device()
        self.batch_sizes: Counter[int] = Counter()  # size -> static batches of that size
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        # Loaded on the batching thread, as the engines load theirs: on CPU a second thread
        # doing torch's parallel work would slow both (bench/common.on_own_thread).
        loaded: Future[None] = Future()
        self._worker = threading.Thread(
            target=self._serve, args=(loaded,), name="peft-static", daemon=True
        )
        self._worker.start()
        loaded.result()

    def _load(self, config: PeftStaticConfig) -> None:
        self.tokenizer = base_models.load_tokenizer(config.base)
        base = base_models.load_model(config.base, self.device)
        self.eos = {int(token) for token in end_ids(base, self.tokenizer) if token is not None}
        self.max_model_len = int(getattr(base.config, "max_position_embeddings", 0) or 2048)
        self.model = _wrap_with_adapters(base, config.adapters)

    def models(self) -> list[str]:
        return [BASE_MODEL_NAME, *sorted(self.config.adapters)]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def submit(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None = None,
        on_text: TokenCallback | None = None,
    ) -> Future[GenerationResult]:
        """Queue one request; the future resolves when its static batch has ended.

        Raises:
            UnknownModel: ``model`` is neither ``base`` nor one of the config's adapters.
            InputError: sampling asked for (this baseline decodes greedily only), an empty
                prompt, or prompt + max_tokens beyond the model's context.
        """
        if model != BASE_MODEL_NAME and model not in self.config.adapters:
            raise UnknownModel(f"the model {model!r} does not exist")
        params = params or SamplingParams()
        self._check(prompt_ids, params)
        if self._closed:
            raise LoraOpsError("the engine is shutting down")
        future: Future[GenerationResult] = Future()
        self._queue.put(_Pending(list(prompt_ids), model, params, future, on_text))
        return future

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        # A baseline that sampled where the engine is asked to sample would be compared on
        # different work; refusing keeps every comparison greedy against greedy.
        if params.temperature > 0:
            raise InputError("the PEFT baseline decodes greedily only", field="temperature")
        if params.seed is not None:
            raise InputError(
                "the PEFT baseline decodes greedily; a seed means nothing", field="seed"
            )
        if not prompt_ids:
            raise InputError("the prompt holds no tokens", field="prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InputError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {len(prompt_ids)} and max_tokens asks for {params.max_tokens} more",
                field="max_tokens",
            )

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=60)

    def _serve(self, loaded: Future[None]) -> None:
        try:
            self._load(self.config)
        except BaseException as error:
            loaded.set_exception(error)
            return
        loaded.set_result(None)
        stopping = False
        while not stopping:
            batch, stopping = self._gather()
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)
        self._fail_waiting()

    def _gather(self) -> tuple[list[_Pending], bool]:
        """The next static batch, and whether the stop signal came with it."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.config.batch_window_s
        while len(batch) < self.config.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _fail_waiting(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(LoraOpsError("the engine is shutting down"))

    def _run(self, batch: list[_Pending]) -> None:
        rows = [_Row(item, self.tokenizer, self.eos) for item in batch]
        self.batch_sizes[len(rows)] += 1
        try:
            self._generate(rows)
        except Exception as exc:  # every caller of the batch hears of it; the engine lives on
            log.exception("static batch of %d failed", len(batch))
            for item in batch:
                with contextlib.suppress(InvalidStateError):
                    item.future.set_exception(exc)
            return
        for row in rows:
            row.pending.future.set_result(row.result())

    def _generate(self, rows: list[_Row]) -> None:
        pad_id = int(self.tokenizer.pad_token_id)
        input_ids, attention_mask = _left_pad([r.pending.prompt_ids for r in rows], pad_id)
        adapter_names = [
            PEFT_BASE_ROW if r.pending.model == BASE_MODEL_NAME else r.pending.model for r in rows
        ]
        with torch.no_grad(), base_models.autocast_for(self.device):
            self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                adapter_names=adapter_names,
                max_new_tokens=max(r.params.max_tokens for r in rows),
                do_sample=False,
                pad_token_id=pad_id,
                # An empty list switches generate's batch-wide end-of-turn stop off (None
                # would fall back to the model's); _RowsDone applies it row by row instead.
                eos_token_id=[],
                stopping_criteria=StoppingCriteriaList(
                    [_RowsDone(rows, input_ids.shape[1], self.eos)]
                ),
                streamer=_RowStreamer(rows),
            )


def _wrap_with_adapters(base: PreTrainedModel, adapters: Mapping[str, Path]) -> PeftModel:
    (first_name, first_folder), *others = adapters.items()
    model = PeftModel.from_pretrained(base, str(first_folder), adapter_name=first_name)
    for name, folder in others:
        model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    return model


def _left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, so every row's next token is at the same position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask
