"""The engine lora-ops served with before continuous batching, kept as the peer to beat.

Frozen from ``lora_ops/serving/engine.py`` as it stood (commit a782926) and renamed: it
gathers requests for ``batch_window_s``, then decodes that batch to its end (the KV cache
of ``generate_batch`` growing step by step) before it looks at the queue again. The
benchmarks run it beside today's engine on the same model, adapters and workload. It is
not part of the product; only its names changed, and it loads its model on its batcher
thread, as today's engine does, so neither pays for a second OpenMP pool on CPU
(``bench/common.on_own_thread``) and the comparison is of the scheduling alone.
"""

from __future__ import annotations

import logging
import math
import queue
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from lora_ops import base_models
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.generation import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenCallback,
    encode_chat,
    generate_batch,
)
from lora_ops.serving.cache import AdapterCache, CacheStats, UnknownModel
from lora_ops.serving.sources import AdapterSource, SourcePolicy, SourceUnavailable
from lora_ops.settings import get_settings

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"
__all__ = ["WindowEngine", "WindowEngineConfig"]


class Overloaded(LoraOpsError):
    """The request queue is full; the caller should retry after ``retry_after_s``."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the replica is at capacity ({limit} requests waiting); retry in {retry_after_s} s"
        )


@dataclass
class EngineStats(CacheStats):
    """Counters the HTTP layer exports as Prometheus metrics."""

    requests: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # size -> batches
    generated_tokens: int = 0
    prompt_tokens: int = 0
    rejected: int = 0  # refused because the queue was full


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResult]
    on_text: TokenCallback | None


@dataclass(frozen=True)
class WindowEngineConfig:
    """How an engine serves: its base model, and the limits that keep a replica responsive.

    Args:
        base: catalogue name or transformers folder of the base model.
        max_adapters: adapters kept resident at once (least recently used go first).
        max_adapter_bytes: optional byte budget for resident adapters' weights.
        max_batch_size: most requests decoded in one batch.
        batch_window_s: how long the first request of a batch waits for company.
        max_queue: most requests waiting for a batch; more are refused (:class:`Overloaded`).
        max_model_len: most tokens (prompt + completion) of one request; at most, and by
            default, the base model's context length.
        adapter_roots: folders local adapters must lie in; ``None`` accepts any folder
            (in-process use), an empty sequence none (``lora-ops serve`` passes its roots).
        bucket: the one S3 bucket adapters may come from (default: the settings' bucket).
        work_dir: where fetched adapter files are kept while they load.
    """

    base: str | Path
    max_adapters: int = 8
    max_adapter_bytes: int | None = None
    max_batch_size: int = 16
    batch_window_s: float = 0.01
    max_queue: int = 256
    max_model_len: int | None = None
    adapter_roots: Sequence[Path] | None = None
    bucket: str | None = None
    work_dir: Path | None = None


class WindowEngine:
    """Serve a base model and many adapters beside it, as ``config`` says."""

    def __init__(self, config: WindowEngineConfig) -> None:
        if min(config.max_adapters, config.max_batch_size, config.max_queue) < 1:
            raise InputError("max_adapters, max_batch_size and max_queue must be >= 1")
        self.config = config
        self.base = str(config.base)
        self.max_adapters = config.max_adapters
        self.max_batch_size = config.max_batch_size
        self.batch_window_s = config.batch_window_s
        self.max_queue = config.max_queue
        self.stats = EngineStats()
        self._lock = threading.RLock()  # the model: decoding, loading, evicting
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-ops-adapters-")
        self.work_dir = Path(config.work_dir) if config.work_dir else Path(self._tmp.name)
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=self.max_queue)
        self._closed = False
        self._batch_s = 0.1  # running mean of one batch's time, for Retry-After
        loaded: Future[None] = Future()
        self._worker = threading.Thread(
            target=self._serve, args=(loaded,), name="engine-batcher", daemon=True
        )
        self._worker.start()
        loaded.result()

    def _load(self, config: WindowEngineConfig) -> None:
        self.tokenizer = base_models.load_tokenizer(config.base)
        self.model = base_models.load_model(config.base)
        self.max_model_len = _context_length(self.model, config.max_model_len)
        policy = SourcePolicy(config.adapter_roots, config.bucket or get_settings().bucket)
        self.cache = AdapterCache(
            self.model,
            policy,
            self.work_dir,
            self.stats,
            self.max_adapters,
            config.max_adapter_bytes,
        )

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

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def room(self, prompt_tokens: int) -> int:
        """How many tokens a request with this prompt may still generate."""
        return self.max_model_len - prompt_tokens

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None = None,
        on_text: TokenCallback | None = None,
    ) -> Future[GenerationResult]:
        """Queue one request; the future resolves when its batch has finished it.

        Raises:
            UnknownModel: ``model`` is neither ``base`` nor a loaded adapter.
            InputError: an empty prompt, or prompt + max_tokens beyond ``max_model_len``.
            Overloaded: ``max_queue`` requests are already waiting.
        """
        adapter = None if model == BASE_MODEL_NAME else model
        if adapter is not None and adapter not in self.cache.sources:
            raise UnknownModel(f"the model {model!r} does not exist")
        params = params or SamplingParams()
        self._check_fits(len(prompt_ids), params.max_tokens)
        if self._closed:
            raise LoraOpsError("the replica is shutting down")
        future: Future[GenerationResult] = Future()
        request = GenerationRequest(prompt_ids, adapter, params)
        try:
            self._queue.put_nowait(_Pending(request, future, on_text))
        except queue.Full:
            self.stats.rejected += 1
            raise Overloaded(self.max_queue, self._retry_after_s()) from None
        return future

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        # Checked here, not in the batch: a bad request must not fail its batch-mates.
        if prompt_tokens == 0:
            raise InputError("the prompt holds no tokens", field="prompt")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise InputError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {prompt_tokens} and max_tokens asks for {max_tokens} more",
                field="max_tokens",
            )

    def _retry_after_s(self) -> int:
        batches_ahead = self._queue.qsize() / self.max_batch_size
        return max(1, math.ceil(batches_ahead * self._batch_s))

    def close(self) -> None:
        self._closed = True
        try:
            self._queue.put(None, timeout=30)  # the batcher frees a slot within a batch
        except queue.Full:
            log.error("the batcher did not take the stop signal")
        self._worker.join(timeout=30)
        self._tmp.cleanup()

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
            for group in self._fit_cache(batch):
                self._run(group)
        self._fail_waiting()

    def _gather(self) -> tuple[list[_Pending], bool]:
        """The next batch, and whether the stop signal came with it."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
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
                item.future.set_exception(LoraOpsError("the replica is shutting down"))

    def _fit_cache(self, batch: list[_Pending]) -> list[list[_Pending]]:
        """Split a batch so no part needs more adapters than the cache holds."""
        groups: list[list[_Pending]] = [[]]
        adapters: set[str] = set()
        for item in batch:
            name = item.request.adapter
            if name is not None and name not in adapters and len(adapters) == self.max_adapters:
                groups.append([])
                adapters = set()
            if name is not None:
                adapters.add(name)
            groups[-1].append(item)
        return groups

    def _run(self, group: list[_Pending]) -> None:
        live = [item for item in group if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        with self._lock:
            wanted = list(dict.fromkeys(i.request.adapter for i in live if i.request.adapter))
            failed = self.cache.ensure_resident(wanted)
            for item in live:
                if item.request.adapter in failed:
                    item.future.set_exception(_for_caller(item.request.adapter, failed))
            ready = [item for item in live if item.request.adapter not in failed]
            if ready:
                self._decode(ready)
        self._batch_s = 0.8 * self._batch_s + 0.2 * (time.monotonic() - started)

    def _decode(self, ready: list[_Pending]) -> None:
        try:
            results = generate_batch(
                self.model,
                self.tokenizer,
                [i.request for i in ready],
                on_text=lambda row, text: _forward(ready, row, text),
            )
        except Exception as exc:  # every waiting caller hears of it; the engine lives on
            log.exception("batch of %d failed", len(ready))
            for item in ready:
                item.future.set_exception(exc)
            return
        self._count(ready, results)
        for item, result in zip(ready, results, strict=True):
            item.future.set_result(result)

    def _count(self, live: list[_Pending], results: list[GenerationResult]) -> None:
        self.stats.requests += len(live)
        self.stats.batches += 1
        self.stats.batch_sizes[len(live)] += 1
        self.stats.generated_tokens += sum(len(r.token_ids) for r in results)
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in results)


def _context_length(model: object, wanted: int | None) -> int:
    """``wanted``, or the model's own context length, which it may not exceed."""
    config = getattr(model, "config", None)
    limit = int(getattr(config, "max_position_embeddings", 0) or 2048)
    if wanted is None:
        return limit
    if not 1 < wanted <= limit:
        raise InputError(f"must be between 2 and the model's {limit}", field="max_model_len")
    return wanted


def _for_caller(name: str, failed: dict[str, Exception]) -> Exception:
    """What a request hears when its adapter could not be loaded back.

    Not the cause itself: that names the server's paths and stores, and the caller's
    request was fine. The cause is in the replica's log.
    """
    cause = failed[name]
    if isinstance(cause, UnknownModel):
        return cause
    return SourceUnavailable(f"the adapter {name!r} cannot be served right now")


def _forward(live: list[_Pending], row: int, text: str) -> None:
    callback = live[row].on_text
    if callback is None:
        return
    try:
        callback(row, text)
    except Exception:  # a listener that went away must not fail its batch-mates
        log.debug("dropping the text listener of row %d", row, exc_info=True)
        live[row].on_text = None
