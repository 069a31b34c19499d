"""Data-parallel training: the process group ``torchrun`` asks for, and the few collectives
the loop needs.

Under ``torchrun --nproc-per-node N`` every process runs the same training on its own
device and takes a share of each micro-batch; the LoRA gradients are summed across the
processes before each optimizer step, so every process holds the same adapter throughout.
Rank 0 alone writes files and reports. Without torchrun (``WORLD_SIZE`` unset or 1) no
process group is made and every function here is a no-op: a single process trains as it
always has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar, cast

import torch
from torch import distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# Long enough for rank 0 to write a checkpoint or evaluate while the others wait for it.
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun describes while inside; nothing for one process.

    gloo on CPUs, nccl on GPUs with this process on ``cuda:LOCAL_RANK``. A group someone
    else made is used as it is and left to them.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=_COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d (%s)", rank(), world_size(), backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and reports (rank 0, or the only process)."""
    return rank() == 0


def local_device() -> torch.device | None:
    """This rank's GPU under nccl; None (the usual default device) otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do, e.g. to fill a cache they then read.

    Rank 0 lets the others go even when its block raises: they then run the block and meet
    the same error (a bad file, an unknown base) and report it themselves, rather than
    wait on a rank that is gone until the launcher kills them or the barrier breaks.
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one from its rank on.

    Every rank draws the same global order, so the shares never overlap and cover it all.
    """
    return list(items[rank() :: world_size()])


def sum_count(count: int) -> int:
    """``count`` summed over the ranks."""
    if not is_distributed():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(total)
    return int(total.item())


def sum_value(value: float) -> float:
    """``value`` summed over the ranks (float64: sums of losses stay exact enough)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item())


def from_main(value: float) -> float:
    """Rank 0's ``value`` on every rank, so decisions taken on it agree everywhere."""
    if not is_distributed():
        return value
    held = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(held, src=0)
    return float(held.item())


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over the ranks, in one collective.

    A rank that saw no example keeps no gradient; it contributes zeros, and afterwards
    holds the sum like every other rank.
    """
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        summed = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
        if param.grad is None:
            param.grad = summed.clone()
        else:
            grad.copy_(summed)


def copy_from_main(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``params``."""
    if not is_distributed():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (picklable values)."""
    if not is_distributed():
        return [value]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return cast(list[T], gathered)


def _collective_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
