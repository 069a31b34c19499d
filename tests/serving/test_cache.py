"""The adapter cache's bookkeeping and memory, on a model of plain linear layers."""

from __future__ import annotations

import multiprocessing
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_ops.lora import LoraSpec, apply_lora, lora_layers, save_adapter
from lora_ops.serving.cache import AdapterCache, CacheStats
from lora_ops.serving.sources import AdapterSource, SourcePolicy

MIB = 1024 * 1024
WIDTH = 1024
BLOCKS = 4
SPEC = LoraSpec(r=64, alpha=64, target_modules=("q_proj", "v_proj"))
ADAPTER_BYTES = BLOCKS * 2 * 2 * SPEC.r * WIDTH * 4  # q and v, A and B, fp32: 4 MiB


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.v_proj = nn.Linear(WIDTH, WIDTH, bias=False)


class Stack(nn.Module):
    """Enough of a transformer for adapters to be loaded into: named projections."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))


def make_adapters(root: Path, count: int, spec: LoraSpec = SPEC) -> list[str]:
    """``count`` PEFT-format adapters for :class:`Stack`, each with its own random weights."""
    model = Stack()
    apply_lora(model, spec, adapter="made")
    names = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for weight in (layer.weight_a("made"), layer.weight_b("made")):
                    weight.copy_(torch.randn(weight.shape, generator=generator))
        save_adapter(model, root / f"a{seed:02d}", adapter="made")
        names.append(f"a{seed:02d}")
    return names


def cache_of(root: Path, **limits: int) -> AdapterCache:
    return AdapterCache(
        Stack(), SourcePolicy([root], "lora-ops"), root / "work", CacheStats(), **limits
    )


def source(root: Path, name: str) -> AdapterSource:
    return AdapterSource(str(root / name))


def test_resident_bytes_are_the_weights_of_each_adapter(tmp_path: Path) -> None:
    names = make_adapters(tmp_path, 2)
    make_adapters(tmp_path / "q-only", 1, LoraSpec(r=8, alpha=8, target_modules=("q_proj",)))
    cache = cache_of(tmp_path, max_adapters=2)
    cache.load("q-only", AdapterSource(str(tmp_path / "q-only" / "a00")))
    for name in names:
        cache.load(name, source(tmp_path, name))
    assert cache.resident == {names[0]: ADAPTER_BYTES, names[1]: ADAPTER_BYTES}
    cache.load("q-only", AdapterSource(str(tmp_path / "q-only" / "a00")))
    assert cache.resident == {names[1]: ADAPTER_BYTES, "q-only": BLOCKS * 2 * 8 * WIDTH * 4}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
    reason="glibc's per-thread arenas, measured in /proc",
)
def test_adapters_coming_and_going_on_two_threads_keep_memory_at_what_is_resident(
    tmp_path: Path,
) -> None:
    # In a fresh process: what earlier tests left in this one's heap would blur the figure.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        grown = pool.apply(memory_growth_of_churn, (str(tmp_path),))
    # Four resident, and room for a load's copies of its file and pages the allocator
    # cannot give back (~25 MiB in all here); without the trim ~50 MiB.
    assert grown < 8 * ADAPTER_BYTES, f"grew {grown / MIB:.1f} MiB for 4 x 4 MiB resident"


def memory_growth_of_churn(root: str) -> int:
    """RSS growth while 12 adapters come and go through a cache of 4, on two threads."""
    tmp_path = Path(root)
    # A replica loads adapters on the HTTP server's worker threads and loads evicted ones
    # back on its batcher thread. glibc kept the pages of evicted adapters in the arena of
    # the thread that had loaded them, so memory grew past what the cache holds: here
    # ~2 x the 4 resident adapters, on SmolLM2 with a cache of 64 ~150 adapters' worth.
    names = make_adapters(tmp_path, 12)
    cache = cache_of(tmp_path, max_adapters=4)
    admin, batcher = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    cache.load("warm-up", source(tmp_path, names[0]))  # first-use buffers of the loaders
    cache.unload("warm-up")
    before = rss_bytes()
    peak = 0
    for round_ in range(6):
        for name in names[round_ * 2 : round_ * 2 + 2]:  # new versions, from an admin
            admin.submit(cache.load, name, source(tmp_path, name)).result()
        for first in range(0, len(names), 2):  # requests for every adapter loaded so far
            wanted = [n for n in names[first : first + 2] if n in cache.sources]
            assert not batcher.submit(cache.ensure_resident, wanted).result()
            peak = max(peak, rss_bytes())
    admin.shutdown()
    batcher.shutdown()
    assert len(cache.resident) == 4
    return peak - before
