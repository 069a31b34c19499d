"""The KV cache the engine manages: preallocated token slots in blocks, shared prefixes.

Every layer's keys and values live in one preallocated tensor of ``num_blocks *
block_size`` token slots (plus one spare slot that padding writes to and nobody reads).
A request owns a list of blocks, taken as it grows and given back when it ends, so the
budget (``--kv-cache-tokens``) is shared by whoever is running rather than reserved for
each request's worst case; when it runs out the engine preempts a request and computes
it again later (:mod:`lora_ops.serving.scheduler`).

Blocks, not one contiguous slot per request: a slot sized for the model's context (8,192
tokens on SmolLM2) would reserve ~380 MB per request, and a budget split into fixed slots
cannot lend one request's unused room to another. The price is one gather per layer per
step (the running rows' keys and values, copied into a batch tensor for attention), small
beside the weights each step reads at this scale; a paged-attention kernel would read the
blocks in place, and torch has none on CPU.

Full blocks are also the unit of prefix reuse (vLLM's automatic prefix caching): a block's
key is a hash of the adapter's identity and every token up to the block's end, so a block
is shared only by requests of the same adapter with the same tokens before it. Freed
blocks that hold a known prefix stay in an LRU pool until their room is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_ops.errors import InputError

DEFAULT_BLOCK_SIZE = 16


@dataclass
class KVCacheStats:
    """What the cache has seen, for the replica's metrics."""

    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens whose KV was reused


class BlockPool:
    """Which blocks are free, which are in use (and by how many requests), which are cached.

    ``num_blocks`` blocks; a block is in exactly one of: the free list, in use (its
    reference count above zero), or cached and unused (in the LRU, evicted first-in when
    room is needed).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise InputError("must hold at least one block", field="kv_cache_tokens")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._unused_cached: OrderedDict[int, None] = OrderedDict()  # LRU first

    def available(self) -> int:
        """Blocks that can be taken now: free ones plus cached ones nobody uses."""
        return len(self._free) + len(self._unused_cached)

    def in_use(self) -> int:
        return self.num_blocks - self.available()

    def take(self) -> int | None:
        """A block for new tokens, or None when every block is in use."""
        if self._free:
            block = self._free.pop()
        elif self._unused_cached:
            block, _ = self._unused_cached.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        return block

    def give_back(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced cached blocks stay findable."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._unused_cached[block] = None
            else:
                self._free.append(block)

    def find(self, key: bytes) -> int | None:
        """The cached block holding the prefix ``key``, with a reference taken, or None."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self._refs[block] == 0:
            del self._unused_cached[block]
        self._refs[block] += 1
        return block

    def share(self, blocks: Sequence[int]) -> list[int]:
        """Take one more reference to each of ``blocks`` (in use by another request)."""
        for block in blocks:
            self._refs[block] += 1
        return list(blocks)

    def remember(self, key: bytes, block: int) -> None:
        """Record that ``block`` (full, in use) holds the prefix ``key``."""
        if key in self._block_of or block in self._hash_of:
            return  # another request computed the same prefix first: keep that one
        self._hash_of[block] = key
        self._block_of[key] = block


def block_key(previous: bytes, adapter: str, tokens: Sequence[int]) -> bytes:
    """The prefix key of a block: its tokens, the key of the block before, the adapter.

    ``adapter`` names the weights, not just the customer (its sha256), so a replaced
    adapter never reuses the old one's keys and values.
    """
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(adapter.encode())
    digest.update(b"\0")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class KVShape:
    """The shape of a model's keys and values, per layer and token."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        text = getattr(config, "text_config", None) or config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return cls(int(text.num_hidden_layers), kv_heads, int(head_dim))

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


class KVStore:
    """The preallocated tensors: per layer, keys and values of every token slot."""

    def __init__(
        self,
        shape: KVShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = shape
        self.block_size = block_size
        self.slots = num_blocks * block_size
        self.spare = self.slots  # padding writes here; masks never let anyone read it
        size = (self.slots + 1, shape.kv_heads, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]

    def slot_of(self, blocks: Sequence[int], position: int) -> int:
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))


class ForwardCache:
    """What one forward pass hands the model as its cache: where each new token's keys and
    values go, and which slots each row's attention reads.

    Duck-typed to what transformers' attention layers call (``update``): the model's own
    cache classes assume every row sits at the same position, which a running batch of
    requests of different lengths never does.

    Args:
        store: the engine's preallocated keys and values.
        write_slots: (rows * new tokens,) the slot each new token goes to.
        read_slots: (rows, context) the slots each row attends to, in position order.
    """

    is_compileable = False

    def __init__(self, store: KVStore, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        self.store = store
        self.write_slots = write_slots
        self.read_slots = read_slots

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values; return each row's whole context."""
        rows, heads, new, dim = key_states.shape
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        flat = (rows * new, heads, dim)
        keys.index_copy_(0, self.write_slots, key_states.transpose(1, 2).reshape(flat))
        values.index_copy_(0, self.write_slots, value_states.transpose(1, 2).reshape(flat))
        # (rows, context, heads, dim) -> (rows, heads, context, dim), as attention wants.
        context = (rows, self.read_slots.shape[1], heads, dim)
        read = self.read_slots.reshape(-1)
        return (
            keys.index_select(0, read).view(context).transpose(1, 2),
            values.index_select(0, read).view(context).transpose(1, 2),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.read_slots.shape[1])
