"""The train/eval split: by content hash, so an example's side depends on nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from lora_ops.data.examples import Example, canonical_json
from lora_ops.errors import InputError


def _example_hash(example: Example) -> int:
    key = canonical_json(example.messages, example.tools)
    return int(hashlib.sha256(key.encode()).hexdigest(), 16)


def split_examples(
    examples: Sequence[Example], eval_fraction: float
) -> tuple[list[Example], list[Example]]:
    """Split by content hash, so an example's side never depends on file order or on others.

    An example goes to eval when sha256(canonical_json) / 2**256 < eval_fraction. With
    two or more examples each side gets at least one: if eval would be empty the lowest-hash
    example moves to it; if train would be empty the highest-hash one moves to it. A single
    example goes to train. Each side keeps the input order.

    Raises:
        InputError: eval_fraction is not strictly between 0 and 1.
    """
    check_eval_fraction(eval_fraction)
    if len(examples) < 2:
        return list(examples), []
    hashes = [_example_hash(example) for example in examples]
    to_eval = [h / 2**256 < eval_fraction for h in hashes]
    if not any(to_eval):
        to_eval[hashes.index(min(hashes))] = True
    if all(to_eval):
        to_eval[hashes.index(max(hashes))] = False
    train = [e for e, is_eval in zip(examples, to_eval, strict=True) if not is_eval]
    return train, [e for e, is_eval in zip(examples, to_eval, strict=True) if is_eval]


def check_eval_fraction(eval_fraction: float) -> None:
    """Refuse a share of held-out examples outside (0, 1), naming the field.

    Raises:
        InputError: eval_fraction is not strictly between 0 and 1 (NaN included).
    """
    if not 0 < eval_fraction < 1:
        reason = f"must be between 0 and 1 (exclusive), got {eval_fraction}"
        raise InputError(reason, field="eval_fraction")
