"""The adapters a replica can serve, and the few of them resident in the model at once.

An adapter evicted from the model is loaded back from where it came from when it is asked
for again, and must still match the sha256 it had when it was first loaded (the one given
at load, or else the one it was first served with). Callers hold the engine's model lock.

Memory freed by evictions is handed back to the system after every load and unload
(:func:`release_freed_memory`), so a replica's resident memory stays at its base model
plus the adapters it holds, however many adapters come and go.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from lora_ops import names
from lora_ops.errors import InputError, LoraOpsError
from lora_ops.files import sha256_file
from lora_ops.lora import LoRALinear, delete_adapter, load_adapter
from lora_ops.serving import sources
from lora_ops.serving.sources import AdapterSource, SourcePolicy

log = logging.getLogger(__name__)
WEIGHTS = sources.WEIGHTS


class UnknownModel(LoraOpsError):
    """A request named a model that is neither ``base`` nor a loaded adapter."""


@dataclass
class CacheStats:
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0


class AdapterCache:
    """Adapters by name, at most ``max_adapters`` (and ``max_adapter_bytes``) resident.

    Args:
        model: the base model the adapters are loaded into.
        policy: where adapters may come from.
        work_dir: where fetched files are kept while they load.
        stats: counters of hits, misses and evictions.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: SourcePolicy,
        work_dir: Path,
        stats: CacheStats,
        max_adapters: int = 8,
        max_adapter_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.work_dir = work_dir
        self.stats = stats
        self.max_adapters = max_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.sources: dict[str, AdapterSource] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first

    def load(self, name: str, source: AdapterSource) -> None:
        """Load (or replace) adapter ``name``; on any failure nothing changes.

        Raises:
            InputError: bad name, a refused or missing location, checksum mismatch, or an
                adapter that does not fit this base.
            SourceUnavailable: S3 or the registry could not be read.
        """
        names.check_adapter_name(name)
        self.policy.check(name, source.uri)  # before anything resident is touched
        previous = self.sources.get(name)
        if name in self.resident:
            self._evict(name)
        self.sources[name] = source
        failed = self.ensure_resident([name])
        if name in failed:
            if previous is None:
                del self.sources[name]
            else:
                self.sources[name] = previous  # still loadable from where it was
            raise failed[name]

    def is_resident(self, name: str) -> bool:
        """Whether adapter ``name`` is in the model now; the one read that needs no lock.

        The HTTP handlers ask it while the step thread may be loading or evicting: a dict
        lookup is atomic under the GIL, so the answer is from just before or just after
        such a change, never an error. Good for reporting, not for deciding anything.
        """
        return name in self.resident

    def unload(self, name: str) -> None:
        if name not in self.sources:
            raise UnknownModel(f"no adapter named {name!r} is loaded")
        if name in self.resident:
            self._evict(name)
            release_freed_memory()
        del self.sources[name]

    def ensure_resident(self, wanted: Sequence[str]) -> dict[str, Exception]:
        """Make ``wanted`` resident, evicting least recently used adapters not wanted.

        Returns:
            The adapters that could not be made resident, with why: the caller fails
            only their requests, so one bad adapter does not fail its batch-mates.
        """
        failed: dict[str, Exception] = {}
        misses = 0
        for name in wanted:
            if name in self.resident:
                self.stats.cache_hits += 1
                self.resident.move_to_end(name)
                continue
            source = self.sources.get(name)
            if source is None:  # unloaded while its requests waited
                failed[name] = UnknownModel(f"the model {name!r} does not exist")
                continue
            self.stats.cache_misses += 1
            misses += 1
            try:
                self._make_resident(name, source, keep=wanted)
            except Exception as exc:
                log.warning("adapter %s could not be loaded from %s: %s", name, source.uri, exc)
                failed[name] = exc
        if misses:  # evicted adapters, and the buffers each load read its files into
            release_freed_memory()
        return failed

    def _make_resident(self, name: str, source: AdapterSource, keep: Sequence[str]) -> None:
        """Fetch and verify ``name``, then evict what it needs room from, then load it.

        Verification comes first, so an adapter that fails it evicts nobody.
        """
        folder = sources.fetch(name, source, self.policy, self.work_dir)
        try:
            digest = _verify(folder, source)
            self._make_room(keep)
            load_adapter(self.model, folder, name)
        except InputError as exc:
            _point_at_source(exc, folder, source.uri)
            raise
        finally:
            sources.discard(folder, self.work_dir)
        if source.expected_sha256 is None:
            # Pin what was served first: a reload after eviction must be the same adapter.
            self.sources[name] = replace(source, expected_sha256=digest)
        self.resident[name] = _adapter_bytes(self.model, name)

    def _make_room(self, keep: Sequence[str]) -> None:
        """Evict least recently used adapters, never one in ``keep``, until one more fits."""
        while self._over_budget(extra=1):
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                return
            self._evict(victim)
            self.stats.evictions += 1

    def _evict(self, name: str) -> None:
        delete_adapter(self.model, name)
        del self.resident[name]

    def _over_budget(self, extra: int) -> bool:
        count = len(self.resident) + extra > self.max_adapters
        size = self.max_adapter_bytes is not None and (
            sum(self.resident.values()) > self.max_adapter_bytes
        )
        return count or size


def _adapter_bytes(model: nn.Module, name: str) -> int:
    """The bytes of adapter ``name``'s weights on ``model``.

    The walk stops at LoRA layers: each resident adapter adds three modules to every one
    of them, so walking all modules (``lora_layers``) visits ~24,000 on SmolLM2 with 64
    adapters resident, ~50 ms of every load.
    """
    total = 0
    modules = [model]
    while modules:
        module = modules.pop()
        if isinstance(module, LoRALinear):
            if name in module.specs:
                total += module.weight_a(name).nbytes + module.weight_b(name).nbytes
        else:
            modules.extend(module.children())
    return total


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Hand the free pages of the C heap back to the system (glibc; elsewhere nothing).

    glibc gives each thread that allocates its own arena, and returns freed memory to the
    system only from the top of an arena. Admin loads run on the HTTP server's worker
    threads, reloads after evictions on the batcher's, so an evicted adapter's pages
    stayed resident in the arena of the thread that had loaded it while the next load
    took new ones in another: a SmolLM2 replica with a cache of 64 and 1,000 adapters
    coming and going held ~150 adapters' worth over its base instead of 64.
    ``malloc_trim`` releases every whole free page of every arena; it takes ~0.1 ms.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _verify(folder: Path, source: AdapterSource) -> str:
    """The weights' sha256, which must be the expected one when there is one."""
    if not (folder / WEIGHTS).is_file():
        raise InputError(f"no {WEIGHTS} in the adapter", file=source.uri)
    digest = sha256_file(folder / WEIGHTS)
    if source.expected_sha256 and digest != source.expected_sha256:
        raise InputError(f"{WEIGHTS} does not match the sha256 recorded for it", file=source.uri)
    return digest


def _point_at_source(exc: InputError, fetched: Path, uri: str) -> None:
    """Name the adapter's own location in ``exc``, not the private copy it was read from."""
    if exc.file is not None and exc.file.startswith(str(fetched)):
        exc.file = uri + exc.file.removeprefix(str(fetched))
        exc.args = (exc.render(),)
