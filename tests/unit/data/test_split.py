"""Tests for lora_ops.data.split: by content hash, whatever the order, both sides filled."""

from __future__ import annotations

import random

import pytest

from lora_ops import data
from lora_ops.data import Example
from lora_ops.errors import InputError
from tests.unit.data.samples import example


def make_examples(count: int) -> list[Example]:
    return [
        example(("user", f"question {i}"), ("assistant", f"answer {i}"), line=i + 1)
        for i in range(count)
    ]


def contents(examples: list[Example]) -> set[str]:
    return {e.messages[0]["content"] for e in examples}


def test_split_is_deterministic_and_independent_of_order() -> None:
    examples = make_examples(200)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)

    train, held_out = data.split_examples(examples, 0.2)
    train_again, held_out_again = data.split_examples(examples, 0.2)
    train_shuffled, held_out_shuffled = data.split_examples(shuffled, 0.2)

    assert (train, held_out) == (train_again, held_out_again)
    assert contents(held_out_shuffled) == contents(held_out)
    assert contents(train_shuffled) == contents(train)
    assert [e.line for e in train] == sorted(e.line for e in train)  # input order kept
    # Adding examples never moves existing ones.
    _, held_out_more = data.split_examples(make_examples(300), 0.2)
    assert contents(held_out) <= contents(held_out_more)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_split_roughly_respects_the_eval_fraction(fraction: float) -> None:
    train, held_out = data.split_examples(make_examples(2000), fraction)

    assert len(train) + len(held_out) == 2000
    assert abs(len(held_out) / 2000 - fraction) < 0.03


def test_split_keeps_at_least_one_example_each_side() -> None:
    two = make_examples(2)
    assert [len(side) for side in data.split_examples(two, 0.0001)] == [1, 1]
    assert [len(side) for side in data.split_examples(two, 0.9999)] == [1, 1]
    assert data.split_examples(two[:1], 0.5) == (two[:1], [])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_refuses_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(InputError) as caught:
        data.split_examples(make_examples(4), fraction)
    assert caught.value.field == "eval_fraction"
