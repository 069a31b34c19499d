"""The serving engine: one base model, many adapters, a running batch scheduled per step.

Every decoding step, the engine drops requests whose callers went away, admits waiting
requests fairly between customers while the batch and the KV cache have room
(:mod:`~lora_ops.serving.scheduler`), computes one chunk of each new prompt and one token
of every other row, and answers the rows that finished. A short request arriving while
long ones decode starts at the next step instead of after them; a long prompt is computed
a chunk per step (``prefill_chunk_tokens``) so the rows already decoding keep going.

Each row goes through its own adapter (or the base): a request joining copies its
adapter's weights into its slot (:mod:`lora_ops.lora.slots`), made resident by the cache
(:mod:`~lora_ops.serving.cache`) that keeps adapters in memory within a byte budget. Keys
and values live in the preallocated blocks of :mod:`~lora_ops.serving.kv_cache`; when
they run out, the newest row is preempted and computed again later, never an out-of-memory
failure. No HTTP here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import threading
import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lora_ops import base_models
from lora_ops.chat import encode_chat_ids
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.generation import (
    DecodingRow,
    Delta,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    end_ids,
)
from lora_ops.lora.slots import AdapterSlots
from lora_ops.serving.batch import StepPlanner
from lora_ops.serving.cache import AdapterCache, UnknownModel
from lora_ops.serving.engine_config import EngineConfig, context_length
from lora_ops.serving.grammar import Grammar, GrammarCompiler
from lora_ops.serving.kv_cache import DEFAULT_BLOCK_SIZE, BlockPool, KVShape, KVStore
from lora_ops.serving.runner import ModelRunner
from lora_ops.serving.scheduler import DeltaCallback, Overloaded, Scheduler, Sequence
from lora_ops.serving.sources import AdapterSource, SourcePolicy, SourceUnavailable
from lora_ops.serving.stats import EngineStats
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"
__all__ = ["AdapterSource", "Engine", "EngineConfig", "EngineStats", "Overloaded", "UnknownModel"]


class Engine:
    """Serve a base model and many adapters beside it, as ``config`` says."""

    def __init__(self, config: EngineConfig) -> None:
        limits = (
            config.max_adapters,
            config.max_batch_size,
            config.max_queue,
            config.max_requests_per_model,
            config.prefill_chunk_tokens,
        )
        if min(limits) < 1:
            raise InputError(
                "max_adapters, max_batch_size, max_queue, max_requests_per_model and "
                "prefill_chunk_tokens must be >= 1"
            )
        self.config = config
        self.base = str(config.base)
        self.max_adapters = config.max_adapters
        self.max_batch_size = config.max_batch_size
        self.max_queue = config.max_queue
        self.stats = EngineStats()
        self._lock = threading.RLock()  # the model: forwards, loading, evicting
        self._wake = threading.Condition()  # the scheduler's queues, and new work
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-ops-adapters-")
        self.work_dir = Path(config.work_dir) if config.work_dir else Path(self._tmp.name)
        self.scheduler = Scheduler(config.max_queue, config.max_requests_per_model)
        self._closed = False
        self._request_s = 1.0  # running mean of a request's time, for Retry-After
        # The step thread loads the model and runs every forward: on CPU, a second thread
        # doing torch's parallel work (this one, had it loaded the model) keeps its own
        # OpenMP pool, and two pools on as many cores as one pool's threads stop spinning
        # between operations: each of a step's ~200 small matmuls then waits to wake its
        # helpers (1.5x to 1.7x slower steps on 2 cores, see bench/RESULTS.md).
        loaded: Future[None] = Future()
        self._worker = threading.Thread(
            target=self._serve, args=(loaded,), name="engine-steps", daemon=True
        )
        self._worker.start()
        try:
            loaded.result()
        except BaseException:
            self._worker.join()
            self._tmp.cleanup()
            raise

    def _load(self, config: EngineConfig) -> None:
        """The model, its adapters' cache and its KV cache (on the step thread)."""
        self.tokenizer = base_models.load_tokenizer(config.base)
        self.model = base_models.load_model(config.base)
        self.max_model_len = context_length(self.model, config.max_model_len)
        policy = SourcePolicy(config.adapter_roots, config.bucket or get_settings().bucket)
        self.cache = AdapterCache(
            self.model,
            policy,
            self.work_dir,
            self.stats,
            self.max_adapters,
            config.max_adapter_bytes,
        )
        self.kv_capacity, self.planner = self._kv_cache(config)
        self._device = next(self.model.parameters()).device
        self._eos = end_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        eos_ids = [int(token) for token in self._eos if token is not None]
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, eos_ids)

    def _kv_cache(self, config: EngineConfig) -> tuple[int, StepPlanner]:
        tokens = config.kv_cache_tokens or max(self.max_model_len, 1024 * config.max_batch_size)
        if tokens < 2:
            raise InputError("must be at least 2", field="kv_cache_tokens")
        device = next(self.model.parameters()).device
        dtype = torch.bfloat16 if device.type == "cuda" else self.model.dtype
        blocks = -(-tokens // DEFAULT_BLOCK_SIZE)
        store = KVStore(KVShape.of(self.model.config), blocks, DEFAULT_BLOCK_SIZE, dtype, device)
        # One slot more than rows: room to swap two rows' weights when the batch is tidied.
        slots = AdapterSlots(self.model, config.max_batch_size + 1, dtype)
        pad = self.tokenizer.pad_token_id
        runner = ModelRunner(self.model, store, slots, int(pad if pad is not None else 0))
        pool = BlockPool(blocks)
        planner = StepPlanner(runner, pool, self.scheduler, self.stats, config.prefill_chunk_tokens)
        planner.prefix_caching = config.prefix_caching
        return blocks * DEFAULT_BLOCK_SIZE, planner

    # -- adapters -------------------------------------------------------------------------

    def models(self) -> list[str]:
        """``base`` and every adapter name this engine can serve."""
        return [BASE_MODEL_NAME, *sorted(self.cache.sources)]

    def source_of(self, name: str) -> str:
        """Where adapter ``name`` was loaded from (vLLM reports it as the model's root)."""
        return self.cache.sources[name].uri

    def resident_adapters(self) -> list[str]:
        return list(self.cache.resident)

    def load_adapter(self, name: str, source: AdapterSource) -> None:
        """Load (or replace) adapter ``name``; on any failure nothing changes.

        Requests already running on an older version finish on it (their slots hold a
        copy); requests admitted afterwards get the new one.

        Raises:
            InputError: bad name, a refused or missing location, checksum mismatch, or an
                adapter that does not fit this base.
            SourceUnavailable: S3 or the registry could not be read.
        """
        with self._lock:
            self.cache.load(name, source)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self.cache.unload(name)

    # -- requests -------------------------------------------------------------------------

    def encode_chat(
        self, messages: Seq[Mapping[str, Any]], tools: Seq[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """A chat's prompt ids in OpenAI's message shape (tools too, :mod:`lora_ops.chat`)."""
        return encode_chat_ids(self.tokenizer, messages, tools)

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Seq[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    @functools.lru_cache(maxsize=65_536)  # noqa: B019 (one engine a replica, kept to its end)
    def token_text(self, token: int) -> str:
        """One token's text, as logprobs name it (a partial UTF-8 character reads U+FFFD)."""
        return str(self.tokenizer.decode([token]))

    def room(self, prompt_tokens: int) -> int:
        """How many tokens a request with this prompt may still generate."""
        return min(self.max_model_len, self.kv_capacity) - prompt_tokens

    def queue_depth(self) -> int:
        return self.scheduler.waiting_count()

    def running_count(self) -> int:
        return len(self.scheduler.running)

    def kv_cache_usage(self) -> float:
        """The fraction of the KV cache's blocks in use (cached but unused ones are free)."""
        pool = self.planner.pool
        return pool.in_use() / pool.num_blocks

    def submit(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None = None,
        on_text: DeltaCallback | None = None,
        grammar: Grammar | None = None,
    ) -> Future[GenerationResult]:
        """Queue one request; the future resolves when it has finished.

        Cancelling the future (a caller that went away) frees its place at the next step.
        ``on_text`` hears each step's new text (and its logprobs); ``grammar`` constrains
        what may be generated (:mod:`~lora_ops.serving.grammar`).

        Raises:
            UnknownModel: ``model`` is neither ``base`` nor a loaded adapter.
            InputError: an empty prompt, or prompt + max_tokens beyond ``max_model_len``
                or the KV cache.
            Overloaded: the queue, or this model's share of it, is full.
        """
        return self.submit_choices(prompt_ids, model, params, 1, on_text, grammar)[0]

    def submit_choices(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None,
        choices: int,
        on_text: DeltaCallback | None = None,
        grammar: Grammar | None = None,
    ) -> list[Future[GenerationResult]]:
        """Queue ``choices`` answers to one prompt (OpenAI's ``n``), or none if any is refused.

        The first computes the prompt; the others join once it has, sharing its blocks.
        With a seed, choice i samples with seed + i, so the choices differ and repeat.
        """
        adapter = None if model == BASE_MODEL_NAME else model
        if adapter is not None and adapter not in self.cache.sources:
            raise UnknownModel(f"the model {model!r} does not exist")
        params = params or SamplingParams()
        self._check_fits(len(prompt_ids), params.max_tokens)
        bias_ids = [token for token, _ in params.logit_bias]
        for field, ids in (("prompt", prompt_ids), ("logit_bias", bias_ids)):
            if any(not 0 <= token < self.vocab_size for token in ids):
                raise InputError(f"token ids must be below {self.vocab_size}", field=field)
        sequences: list[Sequence] = []
        for index in range(choices):
            seeded = params if params.seed is None else replace(params, seed=params.seed + index)
            constraint = self.grammars.constraint(grammar) if grammar else None
            request = GenerationRequest(list(prompt_ids), adapter, seeded, constraint)
            row = DecodingRow(request, self._device)
            leader = sequences[0] if sequences else None
            sequences.append(Sequence(request, Future(), on_text, row, model, index, leader))
        with self._wake:
            if self._closed:
                raise LoraOpsError("the replica is shutting down")
            try:
                self.scheduler.add(sequences, self._retry_after_s())
            except Overloaded:
                self.stats.rejected += 1
                raise
            self._wake.notify()
        return [sequence.future for sequence in sequences]

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        # Checked here, not in the batch: a bad request must not fail its batch-mates.
        if prompt_tokens == 0:
            raise InputError("the prompt holds no tokens", field="prompt")
        limit = min(self.max_model_len, self.kv_capacity)
        if prompt_tokens + max_tokens > limit:
            where = "maximum context length" if limit == self.max_model_len else "KV cache"
            raise InputError(
                f"this model's {where} is {limit} tokens; the prompt has {prompt_tokens} "
                f"and max_tokens asks for {max_tokens} more",
                field="max_tokens",
            )

    def _retry_after_s(self) -> int:
        ahead = self.scheduler.waiting_count() + len(self.scheduler.running)
        return max(1, min(60, math.ceil(ahead * self._request_s / self.max_batch_size)))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=60)
        self._tmp.cleanup()

    # -- the step loop --------------------------------------------------------------------

    def _serve(self, loaded: Future[None]) -> None:
        try:
            self._load(self.config)
        except BaseException as error:
            loaded.set_exception(error)
            return
        loaded.set_result(None)
        while True:
            with self._wake:
                while not self._closed and not self._has_work():
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._step()
            except Exception:  # a bug in a step must not stop the replica answering
                log.exception("a decoding step failed; its requests are failed")
                self.planner.fail_running(LoraOpsError("the request failed on the replica"))
        self._fail_everything(LoraOpsError("the replica is shutting down"))

    def _has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.waiting_count() > 0

    def _step(self) -> None:
        with self._wake:
            finished = self.planner.drop_abandoned()
        self._admit()
        with self._wake:
            plan = self.planner.plan()
        with self._lock:
            outcome = self.planner.run(plan, self.tokenizer, self._eos)
        with self._wake:
            for sequence in outcome.finished:
                self.planner.release(sequence)
        for sequence, delta in outcome.deltas:
            _tell(sequence, delta)
        for sequence in finished + outcome.finished:
            self._answer(sequence)

    def _admit(self) -> None:
        """Admit waiting requests, fairest first, while the batch and the KV cache have room.

        An adapter that must be read back from its source is loaded without the
        scheduler's lock, so submissions (on the server's event loop) never wait for it.
        """
        while True:
            with self._wake:
                sequence = self._next_to_admit()
            if sequence is None:
                return
            name = sequence.request.adapter
            loaded = name is not None and name not in self.cache.resident
            if loaded and name is not None:
                with self._lock:
                    self.cache.ensure_resident([name])
            with self._wake, self._lock:
                adapter_key = self._resident_key(sequence, counted=loaded)
                if adapter_key is None:
                    continue  # failed, and answered
                if not self.planner.admit(sequence, adapter_key):
                    return  # the KV cache is full: wait for rows to finish

    def _next_to_admit(self) -> Sequence | None:
        held: set[str] = set()  # customers whose next request waits for its prompt's leader
        while len(self.scheduler.running) < self.max_batch_size:
            sequence = self.scheduler.next_waiting(held)
            if sequence is None:
                return None
            if sequence.abandoned():
                self.scheduler.drop_waiting(sequence)
                self.stats.abandoned += 1
            elif sequence.waits_for_leader():
                held.add(sequence.tenant)
            else:
                return sequence
        return None

    def _resident_key(self, sequence: Sequence, counted: bool) -> str | None:
        """The adapter's identity for prefix keys, its weights resident; None if it failed.

        Checked again under the model's lock: an admin may have evicted it meanwhile.
        ``counted``: this admission already asked the cache (a hit is not counted twice).
        """
        name = sequence.request.adapter
        if name is None:
            return BASE_MODEL_NAME
        resident = counted and name in self.cache.resident
        failed = {} if resident else self.cache.ensure_resident([name])
        source = self.cache.sources.get(name)
        if name in failed or source is None:
            cause = failed.get(name) or UnknownModel(f"the model {name!r} does not exist")
            self.scheduler.drop_waiting(sequence)
            _fail(sequence, _for_caller(name, cause))
            return None
        return f"{name}@{source.expected_sha256}"

    def _answer(self, sequence: Sequence) -> None:
        if sequence.abandoned():
            self.stats.abandoned += 1
            return
        result = sequence.row.result()
        self.stats.requests += 1
        self.stats.generated_tokens += len(result.token_ids)
        self.stats.prompt_tokens += result.prompt_tokens
        elapsed = time.monotonic() - sequence.submitted
        self.stats.e2e.observe(sequence.tenant, elapsed)
        self._request_s = 0.9 * self._request_s + 0.1 * elapsed
        try:
            sequence.future.set_result(result)
        except InvalidStateError:  # cancelled just now
            self.stats.abandoned += 1

    def _fail_everything(self, error: Exception) -> None:
        with self._wake:
            self.planner.fail_running(error)
            for sequence in list(self.scheduler.all_waiting()):
                self.scheduler.drop_waiting(sequence)
                _fail(sequence, error)


def _for_caller(name: str, cause: Exception) -> Exception:
    """What a request hears when its adapter could not be loaded back.

    Not the cause itself: that names the server's paths and stores, and the caller's
    request was fine. The cause is in the replica's log.
    """
    if isinstance(cause, UnknownModel):
        return cause
    return SourceUnavailable(f"the adapter {name!r} cannot be served right now")


def _fail(sequence: Sequence, error: Exception) -> None:
    with contextlib.suppress(InvalidStateError):  # the caller cancelled first
        sequence.future.set_exception(error)


def _tell(sequence: Sequence, delta: Delta) -> None:
    callback = sequence.on_text
    if callback is None:
        return
    try:
        callback(sequence.choice, delta)
    except Exception:  # a listener that went away must not fail its batch-mates
        log.debug("dropping a text listener", exc_info=True)
        sequence.on_text = None
