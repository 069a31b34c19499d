"""Fair admission between customers: S-LoRA's virtual token counter, caps, preemption."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from lora_ops.generation import DecodingRow, GenerationRequest, SamplingParams
from lora_ops.serving.scheduler import Overloaded, Scheduler, Sequence


def request(tenant: str, prompt: int = 4, at: float = 0.0) -> Sequence:
    ask = GenerationRequest([1] * prompt, None if tenant == "base" else tenant, SamplingParams())
    row = DecodingRow(ask, torch.device("cpu"))
    return Sequence(ask, Future(), None, row, tenant, submitted=at)


def serve(scheduler: Scheduler, rounds: int, tokens: int = 8) -> list[str]:
    """Admit, run to the end and finish one request at a time; the tenants in order."""
    order = []
    for _ in range(rounds):
        chosen = scheduler.next_waiting()
        if chosen is None:
            break
        scheduler.admit(chosen)
        scheduler.charge(chosen.tenant, prompt_tokens=len(chosen.request.prompt_ids))
        scheduler.charge(chosen.tenant, generated_tokens=tokens)
        scheduler.finish(chosen)
        order.append(chosen.tenant)
    return order


def test_a_late_customer_goes_ahead_of_a_flood() -> None:
    scheduler = Scheduler(max_waiting=100, max_per_tenant=100)
    for i in range(50):
        scheduler.add([request("acme", at=i)], retry_after_s=1)
    assert serve(scheduler, 3) == ["acme"] * 3
    scheduler.add([request("globex", at=100)], retry_after_s=1)
    # globex starts level with acme's counter, then acme's next request is charged: at
    # most one acme request goes before it, never the 47 still waiting.
    assert "globex" in serve(scheduler, 2)


def test_busy_customers_share_admissions_in_proportion_to_work() -> None:
    scheduler = Scheduler(max_waiting=200, max_per_tenant=100)
    for i in range(60):
        scheduler.add([request("acme", at=i)], retry_after_s=1)
        scheduler.add([request("globex", at=i + 0.5)], retry_after_s=1)
        scheduler.add([request("initech", at=i + 0.7)], retry_after_s=1)
    order = serve(scheduler, 60)
    counts = {t: order.count(t) for t in ("acme", "globex", "initech")}
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_an_idle_customer_banks_no_credit() -> None:
    scheduler = Scheduler(max_waiting=200, max_per_tenant=100)
    scheduler.add([request("globex")], retry_after_s=1)
    serve(scheduler, 1)  # globex was served once, then went idle
    for i in range(20):
        scheduler.add([request("acme", at=i)], retry_after_s=1)
    serve(scheduler, 10)  # acme's counter passes globex's while globex is away
    for i in range(5):
        scheduler.add([request("globex", at=50 + i)], retry_after_s=1)
    # Lifted to acme's level on return, globex alternates with acme instead of taking the
    # next five admissions on credit it earned while idle.
    order = serve(scheduler, 6)
    assert order.count("acme") >= 2, order


def test_caps_refuse_at_once_with_retry_after() -> None:
    scheduler = Scheduler(max_waiting=3, max_per_tenant=2)
    scheduler.add([request("acme")], retry_after_s=4)
    scheduler.add([request("acme")], retry_after_s=4)
    with pytest.raises(Overloaded, match="'acme' has 2 requests in flight") as refused:
        scheduler.add([request("acme")], retry_after_s=4)
    assert refused.value.retry_after_s == 4
    scheduler.add([request("globex")], retry_after_s=4)
    with pytest.raises(Overloaded, match="3 requests waiting"):
        scheduler.add([request("initech")], retry_after_s=4)


def test_a_preempted_request_goes_back_to_the_head_of_its_queue() -> None:
    scheduler = Scheduler(max_waiting=10, max_per_tenant=10)
    first, second = request("acme", at=0), request("acme", at=1)
    scheduler.add([first], retry_after_s=1)
    scheduler.add([second], retry_after_s=1)
    scheduler.admit(first)
    scheduler.preempt(first)
    assert scheduler.next_waiting() is first
    assert first.preemptions == 1
    assert scheduler.waiting_count() == 2
    assert scheduler.in_flight("acme") == 2
