"""Review decisions read from version tags, and the pause keys that name what a run waits for."""

from __future__ import annotations

import pytest

from lora_ops.errors import InputError
from lora_ops.registry import review
from lora_ops.registry.tags import APPROVED_TAG, REVIEW_TAG


@pytest.mark.parametrize(
    ("tags", "decision"),
    [
        ({}, None),
        ({REVIEW_TAG: review.PENDING}, None),
        ({APPROVED_TAG: "true"}, True),
        ({APPROVED_TAG: " TRUE "}, True),
        ({APPROVED_TAG: "false"}, False),
        ({APPROVED_TAG: "yes please"}, None),
    ],
    ids=["none", "pending", "true", "true-spaced", "false", "unclear"],
)
def test_decision_of(tags: dict[str, str], decision: bool | None) -> None:
    assert review.decision_of(tags) is decision


def test_pause_keys_round_trip_and_ignore_other_pauses() -> None:
    key = review.pause_key("acme-2", "17", 3)
    assert key == "review/acme-2/17/3"
    assert review.parse_pause_key(key) == ("acme-2", "17")
    assert review.parse_pause_key("1") is None  # Prefect's own default pause key
    assert review.parse_pause_key(None) is None
    assert review.parse_pause_key("review/../17/1") is None
    with pytest.raises(InputError):
        review.pause_key("Not Valid", "1", 1)


def test_record_decision_checks_the_version_number_first() -> None:
    with pytest.raises(InputError, match="not a version number"):
        review.record_decision("acme", "latest", approved=True, reviewer="dana")
