"""The eval gate: its decision on each kind of candidate, and the decision as a value."""

from __future__ import annotations

import math
import pickle

import pytest

from lora_ops.training.gate import GateDecision, decide_gate


@pytest.mark.parametrize(
    ("base", "candidate", "production", "passed", "phrase"),
    [
        (3.0, 1.0, None, True, "66.7% below the base's"),
        (3.0, 2.9, None, False, "the gate needs at least 5.0%"),
        (3.0, 1.0, 0.9, False, "worse than production's 0.9000 by more than 2.0%"),
        (3.0, 1.0, 0.99, True, "within 2.0% of production's 0.9900"),
        (3.0, math.nan, None, False, "not finite"),
    ],
    ids=["beats-base", "too-small", "worse-than-prod", "within-tolerance", "diverged"],
)
def test_gate_decision(
    base: float, candidate: float, production: float | None, passed: bool, phrase: str
) -> None:
    gate = decide_gate(base, candidate, production, min_improvement=0.05, production_tolerance=0.02)
    assert gate.passed is passed
    assert phrase in gate.reason


def test_gate_decision_is_a_plain_value() -> None:
    # A value like any dataclass: Prefect may persist it (in EvalOutcome) as a task result.
    gate = decide_gate(3.0, 1.0, 0.99)
    assert isinstance(gate, GateDecision)
    assert pickle.loads(pickle.dumps(gate)) == gate
    assert gate.improvement == pytest.approx(2 / 3)
