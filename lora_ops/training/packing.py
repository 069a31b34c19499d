"""Packing: short examples laid end to end in rows of up to ``max_seq_len`` tokens.

Chat examples are mostly far shorter than the longest one, so right-padded batches spend
much of their compute on padding. A pack holds several examples in one row, and each keeps
its own position ids, restarting at 0. With no 2-D attention mask, transformers reads the
restarts as sequence boundaries (``masking_utils.find_packed_sequence_indices``): sdpa and
eager attention get a block-diagonal causal mask, flash-attention-2 its varlen kernel. So
no token attends across examples, and each example's logits are those it has alone.

The loss stays the one of the unpacked examples: the first label of every example is
dropped (-100), as the first token of an example on its own is never predicted; otherwise
the last token of one example would be trained to predict the first of the next.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from lora_ops.config import TrainConfig
from lora_ops.training.batching import IGNORE_INDEX, Tokenized, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pack:
    """Examples laid end to end in one row; a ``Tokenized`` with position ids besides."""

    input_ids: list[int]  # (seq,)
    labels: list[int]  # (seq,), -100 on each example's first token
    position_ids: list[int]  # (seq,), 0, 1, ... from each example's start
    lengths: tuple[int, ...]  # the examples' lengths, in row order


def training_rows(examples: Sequence[Tokenized], config: TrainConfig) -> Sequence[Tokenized]:
    """What micro-batches are drawn from: the examples, or with ``config.packing`` their packs."""
    if not config.packing:
        return examples
    packs = pack_examples(examples, config.max_seq_len)
    log.info(
        "%d examples packed into %d rows of up to %d tokens, %.0f%% full",
        len(examples),
        len(packs),
        config.max_seq_len,
        100 * fill_ratio(packs, config.max_seq_len),
    )
    return packs


def pack_examples(examples: Sequence[Tokenized], max_len: int) -> list[Pack]:
    """Pack ``examples`` into rows of at most ``max_len`` tokens, best-fit decreasing.

    Longest first, each into the fullest row it still fits (a new row when none has room),
    which fills rows to within a few percent for chat-length examples. The packs depend on
    the examples alone, never on a seed, so a resumed run draws the same packs; the loop
    shuffles their order each epoch. An example longer than ``max_len`` gets a row of its
    own (data preparation has refused those already).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    # (room left, row index), kept sorted: the first entry with enough room is the best fit.
    free: list[tuple[int, int]] = []
    for i in order:
        length = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            rows.append([i])
            room, row = max_len - length, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= length
        if room > 0:
            bisect.insort(free, (room, row))
    return [_pack([examples[i] for i in row]) for row in rows]


def _pack(members: Sequence[Tokenized]) -> Pack:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in members:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        position_ids += range(len(example.input_ids))
    return Pack(input_ids, labels, position_ids, tuple(len(e.input_ids) for e in members))


def collate_rows(
    rows: Sequence[Tokenized], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A micro-batch of packs (see :func:`collate_packs`) or of plain examples (``collate``)."""
    if rows and all(isinstance(row, Pack) for row in rows):
        return collate_packs(cast(Sequence[Pack], rows), pad_id, device)
    return collate(rows, pad_id, device)


def collate_packs(
    packs: Sequence[Pack], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad packs into tensors; no attention mask, so the position ids bound attention.

    The padding after a short row gets positions 0, 1, ... of its own: a segment of its
    own that no real token attends to, and that carries no loss.
    """
    length = max(len(p.input_ids) for p in packs)
    input_ids = torch.full((len(packs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length).repeat(len(packs), 1)  # (rows, seq)
    for row, pack in enumerate(packs):
        n = len(pack.input_ids)
        input_ids[row, :n] = torch.tensor(pack.input_ids)
        labels[row, :n] = torch.tensor(pack.labels)
        position_ids[row, :n] = torch.tensor(pack.position_ids)
        position_ids[row, n:] = torch.arange(length - n)
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "position_ids": position_ids.to(device),
    }


def fill_ratio(packs: Sequence[Pack], max_len: int) -> float:
    """Share of the rows' ``max_len`` tokens that real tokens fill."""
    return sum(len(p.input_ids) for p in packs) / max(1, len(packs) * max_len)
