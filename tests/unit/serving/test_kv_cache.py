"""The KV cache's block pool: taking, giving back, and finding cached prefixes."""

from __future__ import annotations

from lora_ops.serving.kv_cache import BlockPool, block_key


def test_blocks_are_taken_until_none_are_left_and_come_back() -> None:
    pool = BlockPool(3)
    taken = [pool.take() for _ in range(3)]
    assert sorted(b for b in taken if b is not None) == [0, 1, 2]
    assert pool.take() is None
    assert pool.in_use() == 3
    pool.give_back([taken[0]])  # type: ignore[list-item]
    assert pool.available() == 1


def test_a_remembered_prefix_is_found_shared_and_evicted_last_used_first() -> None:
    pool = BlockPool(2)
    first, second = pool.take(), pool.take()
    assert first is not None
    assert second is not None
    key_a = block_key(b"", "acme@1", [1, 2, 3])
    key_b = block_key(b"", "acme@1", [4, 5, 6])
    pool.remember(key_a, first)
    pool.remember(key_b, second)
    assert pool.find(key_a) == first  # shared: two references now
    pool.give_back([first, second])
    assert pool.available() == 1  # first is still held by the sharer
    pool.give_back([first])
    assert pool.available() == 2  # both cached, both free to take
    assert pool.find(key_b) == second
    pool.give_back([second])
    # key_a was used least recently, so its block is the first one taken for new tokens.
    assert pool.take() == first
    assert pool.find(key_a) is None
    assert pool.find(key_b) == second


def test_prefix_keys_depend_on_the_adapter_and_everything_before() -> None:
    tokens = [7, 8, 9]
    assert block_key(b"", "acme@1", tokens) != block_key(b"", "globex@1", tokens)
    assert block_key(b"", "acme@1", tokens) != block_key(b"", "acme@2", tokens)
    assert block_key(b"x", "acme@1", tokens) != block_key(b"", "acme@1", tokens)
    assert block_key(b"", "acme@1", tokens) == block_key(b"", "acme@1", list(tokens))
