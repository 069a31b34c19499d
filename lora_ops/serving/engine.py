"""The serving engine: one base model, an LRU cache of adapters, and a request batcher.

Requests that arrive within a short window are decoded together even when they name
different adapters: each batch row goes through its own adapter. An adapter evicted from
the cache is loaded back from where it came from when it is asked for again. No HTTP here.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from lora_ops import base_models, names
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.lora import delete_adapter, load_adapter, lora_layers
from lora_ops.serving.generation import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenCallback,
    generate_batch,
)
from lora_ops.storage import sha256_file

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"
WEIGHTS = "adapter_model.safetensors"


class UnknownModel(LoraOpsError):
    """A request named a model that is neither ``base`` nor a loaded adapter."""


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter comes from, so an evicted one can be loaded back."""

    uri: str  # a local folder, s3://..., or models:/adapter-<customer>@alias
    expected_sha256: str | None = None


@dataclass
class EngineStats:
    """Counters the HTTP layer exports as Prometheus metrics."""

    requests: int = 0
    batches: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # size -> batches
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class _Pending:
    request: GenerationRequest
    future: Future[GenerationResult]
    on_text: TokenCallback | None


class Engine:
    """Serve a base model and many adapters beside it.

    Args:
        base: catalogue name or transformers folder of the base model.
        max_adapters: adapters kept resident at once (least recently used go first).
        max_adapter_bytes: optional byte budget for resident adapters' weights.
        max_batch_size: most requests decoded in one batch.
        batch_window_s: how long the first request of a batch waits for company.
        work_dir: where downloaded adapters are kept (a temporary folder by default).
    """

    def __init__(
        self,
        base: str | Path,
        *,
        max_adapters: int = 8,
        max_adapter_bytes: int | None = None,
        max_batch_size: int = 16,
        batch_window_s: float = 0.01,
        work_dir: Path | None = None,
    ) -> None:
        if max_adapters < 1 or max_batch_size < 1:
            raise InputError("max_adapters and max_batch_size must be >= 1", field="engine")
        self.base = str(base)
        self.tokenizer = base_models.load_tokenizer(base)
        self.model = base_models.load_model(base)
        self.max_adapters = max_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.stats = EngineStats()
        self._sources: dict[str, AdapterSource] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._lock = threading.RLock()  # the model: decoding, loading, evicting
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-ops-adapters-")
        self.work_dir = Path(work_dir) if work_dir else Path(self._tmp.name)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="engine-batcher", daemon=True)
        self._worker.start()

    # -- adapters -------------------------------------------------------------------------

    def models(self) -> list[str]:
        """``base`` and every adapter name this engine can serve."""
        return [BASE_MODEL_NAME, *sorted(self._sources)]

    def source_of(self, name: str) -> str:
        """Where adapter ``name`` was loaded from (vLLM reports it as the model's root)."""
        return self._sources[name].uri

    def resident_adapters(self) -> list[str]:
        return list(self._resident)

    def load_adapter(self, name: str, source: AdapterSource) -> None:
        """Load (or replace) adapter ``name``; on any failure nothing changes.

        Raises:
            InputError: bad name, missing files, checksum mismatch, or an adapter that
                does not fit this base.
        """
        names.check_customer(name)
        with self._lock:
            previous = self._sources.get(name)
            if name in self._resident:
                self._evict(name)
            self._sources[name] = source
            try:
                self._ensure_resident([name])
            except BaseException:
                if previous is None:
                    del self._sources[name]
                else:
                    self._sources[name] = previous  # still loadable from where it was
                raise

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._sources:
                raise UnknownModel(f"no adapter named {name!r} is loaded")
            if name in self._resident:
                self._evict(name)
            del self._sources[name]

    def _make_resident(self, name: str, source: AdapterSource) -> None:
        folder = self._fetch(name, source)
        if source.expected_sha256 and sha256_file(folder / WEIGHTS) != source.expected_sha256:
            raise InputError(
                f"{WEIGHTS} does not match the sha256 recorded for it", file=source.uri
            )
        load_adapter(self.model, folder, name)
        size = sum(
            (layer.weight_a(name).nbytes + layer.weight_b(name).nbytes)
            for _, layer in lora_layers(self.model)
            if name in layer.specs
        )
        self._resident[name] = size

    def _fetch(self, name: str, source: AdapterSource) -> Path:
        if source.uri.startswith("s3://"):
            from lora_ops.storage import Storage

            target = self.work_dir / name
            Storage.from_settings().download_dir(source.uri, target)  # sha256 per file
            return target
        if source.uri.startswith("models:/"):
            from lora_ops.registry import Registry

            return Registry().download_adapter(source.uri, self.work_dir / name)
        folder = Path(source.uri)
        if not folder.is_dir():
            raise InputError("no such adapter folder", file=source.uri)
        return folder

    def _evict(self, name: str) -> None:
        delete_adapter(self.model, name)
        del self._resident[name]

    def _ensure_resident(self, wanted: Sequence[str]) -> None:
        """Make ``wanted`` resident, evicting least recently used adapters not wanted."""
        for name in wanted:
            if name in self._resident:
                self.stats.cache_hits += 1
                self._resident.move_to_end(name)
                continue
            self.stats.cache_misses += 1
            while self._over_budget(extra=1):
                victim = next((n for n in self._resident if n not in wanted), None)
                if victim is None:
                    break
                self._evict(victim)
                self.stats.evictions += 1
            self._make_resident(name, self._sources[name])

    def _over_budget(self, extra: int) -> bool:
        count = len(self._resident) + extra > self.max_adapters
        size = self.max_adapter_bytes is not None and (
            sum(self._resident.values()) > self.max_adapter_bytes
        )
        return count or size

    # -- requests -------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        # return_dict=True gives a BatchEncoding; the declared return type is a union of every mode.
        return list(cast(Mapping[str, list[int]], encoded)["input_ids"])

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def submit(
        self,
        prompt_ids: list[int],
        model: str,
        params: SamplingParams | None = None,
        on_text: TokenCallback | None = None,
    ) -> Future[GenerationResult]:
        """Queue one request; the future resolves when its batch has finished it."""
        adapter = None if model == BASE_MODEL_NAME else model
        if adapter is not None and adapter not in self._sources:
            raise UnknownModel(f"the model {model!r} does not exist")
        future: Future[GenerationResult] = Future()
        request = GenerationRequest(prompt_ids, adapter, params or SamplingParams())
        self._queue.put(_Pending(request, future, on_text))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
        self._tmp.cleanup()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            for group in self._fit_cache(batch):
                self._run(group)

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
        try:
            with self._lock:
                wanted = list(dict.fromkeys(i.request.adapter for i in live if i.request.adapter))
                self._ensure_resident(wanted)
                results = generate_batch(
                    self.model,
                    self.tokenizer,
                    [i.request for i in live],
                    on_text=lambda row, text: _forward(live, row, text),
                )
        except Exception as exc:  # every waiting caller hears of it; the engine lives on
            log.exception("batch of %d failed", len(live))
            for item in live:
                item.future.set_exception(exc)
            return
        self._count(live, results)
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)

    def _count(self, live: list[_Pending], results: list[GenerationResult]) -> None:
        self.stats.requests += len(live)
        self.stats.batches += 1
        self.stats.batch_sizes[len(live)] += 1
        self.stats.generated_tokens += sum(len(r.token_ids) for r in results)
        self.stats.prompt_tokens += sum(r.prompt_tokens for r in results)


def _forward(live: list[_Pending], row: int, text: str) -> None:
    callback = live[row].on_text
    if callback is not None:
        callback(row, text)
