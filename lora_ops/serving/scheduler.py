"""Who runs next: the requests of a replica, waiting per customer and running in slots.

Admission is fair between customers (the model a request names: an adapter or ``base``),
by S-LoRA's virtual token counter: each customer's counter grows by the work done for it
(a prompt token counts 1, a generated token 2, as VTC weighs them), and the next request
admitted is the oldest of the customer with the lowest counter. A customer who was idle
starts level with the least-served active one, so idling banks no credit; a customer who
floods the replica waits behind everyone else's share, never the other way round. Each
customer may also have only so many requests waiting and running at once; past that, and
past the replica's whole queue, a request is refused at once (:class:`Overloaded`).

No model, no threads here: the engine calls these under its own lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from lora_ops.errors import LoraOpsError
from lora_ops.generation import DecodingRow, Delta, GenerationRequest, GenerationResult

DeltaCallback = Callable[[int, Delta], None]  # (choice index, what it added)

PROMPT_TOKEN_COST = 1.0
GENERATED_TOKEN_COST = 2.0


class Overloaded(LoraOpsError):
    """Refused for want of room; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"{message}; retry in {retry_after_s} s")


@dataclass(eq=False)
class Sequence:
    """One request from submission to its answer: what it asked, where its KV lives."""

    request: GenerationRequest
    future: Future[GenerationResult]
    on_text: DeltaCallback | None
    row: DecodingRow
    tenant: str  # the model it named: an adapter, or "base"
    choice: int = 0  # its index among the choices of one request (OpenAI's ``n``)
    # The first choice of its request, whose prompt blocks this one shares; None for it.
    leader: Sequence | None = None
    submitted: float = field(default_factory=time.monotonic)
    adapter_key: str = ""  # the adapter's identity in prefix keys; set when admitted
    blocks: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    computed: int = 0  # tokens whose keys and values are in the cache
    slot: int = -1  # its place in the running batch
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens: what the cache must hold before the next pick."""
        return self.request.prompt_ids + self.row.tokens

    def uncomputed(self) -> int:
        return len(self.request.prompt_ids) + len(self.row.tokens) - self.computed

    def abandoned(self) -> bool:
        """The caller went away (a disconnected client cancels its future)."""
        return self.future.cancelled()

    def waits_for_leader(self) -> bool:
        """Its leader runs and has not computed the prompt yet: joining now would compute
        the prompt twice instead of sharing it."""
        leader = self.leader
        return leader is not None and leader.slot >= 0 and leader.first_token_at is None


class Scheduler:
    """Waiting queues per customer, the running batch, and the fairness counters.

    Args:
        max_waiting: most requests waiting in all; more are refused.
        max_per_tenant: most requests one customer may have waiting and running.
    """

    def __init__(self, max_waiting: int, max_per_tenant: int) -> None:
        self.max_waiting = max_waiting
        self.max_per_tenant = max_per_tenant
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.served: dict[str, float] = {}  # the virtual token counters
        self._in_flight: dict[str, int] = {}  # waiting + running, per customer
        self._waiting_count = 0

    def waiting_count(self) -> int:
        return self._waiting_count

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def add(self, sequences: list[Sequence], retry_after_s: int) -> None:
        """Queue the choices of one new request, or refuse them all (:class:`Overloaded`)
        when there is no room for every one."""
        tenant = sequences[0].tenant
        count = len(sequences)
        if self._waiting_count + count > self.max_waiting:
            raise Overloaded(
                f"the replica is at capacity ({self.max_waiting} requests waiting)",
                self.max_waiting,
                retry_after_s,
            )
        if self.in_flight(tenant) + count > self.max_per_tenant:
            raise Overloaded(
                f"the model {tenant!r} has {self.max_per_tenant} requests in flight, its limit",
                self.max_per_tenant,
                retry_after_s,
            )
        if self.in_flight(tenant) == 0:
            self._level(tenant)
        self.waiting.setdefault(tenant, deque()).extend(sequences)
        self._in_flight[tenant] = self.in_flight(tenant) + count
        self._waiting_count += count

    def _level(self, tenant: str) -> None:
        """An idle customer comes back level with the least-served active one (VTC's lift)."""
        active = [self.served.get(t, 0.0) for t, n in self._in_flight.items() if n > 0]
        floor = min(active) if active else max(self.served.values(), default=0.0)
        self.served[tenant] = max(self.served.get(tenant, 0.0), floor)

    def next_waiting(self, skip: set[str] | None = None) -> Sequence | None:
        """The request fairness says goes next (not yet taken off its queue)."""
        best: Sequence | None = None
        best_key: tuple[float, float] | None = None
        for tenant, queue in self.waiting.items():
            if not queue or (skip and tenant in skip):
                continue
            key = (self.served.get(tenant, 0.0), queue[0].submitted)
            if best_key is None or key < best_key:
                best, best_key = queue[0], key
        return best

    def admit(self, sequence: Sequence) -> None:
        """Move ``sequence`` (the head of its queue) into the running batch."""
        self._take(sequence)
        self.running.append(sequence)

    def drop_waiting(self, sequence: Sequence) -> None:
        """Take a waiting request out for good (failed or abandoned before it ran)."""
        self._take(sequence)
        self._done(sequence.tenant)

    def _take(self, sequence: Sequence) -> None:
        queue = self.waiting[sequence.tenant]
        queue.remove(sequence)
        if not queue:
            del self.waiting[sequence.tenant]
        self._waiting_count -= 1

    def finish(self, sequence: Sequence) -> None:
        """A running request is done (answered, failed or abandoned)."""
        self.running.remove(sequence)
        self._done(sequence.tenant)

    def _done(self, tenant: str) -> None:
        self._in_flight[tenant] -= 1
        if self._in_flight[tenant] == 0:
            del self._in_flight[tenant]

    def preempt(self, sequence: Sequence) -> None:
        """Send a running request back to the head of its queue, to be computed again."""
        self.running.remove(sequence)
        self.waiting.setdefault(sequence.tenant, deque()).appendleft(sequence)
        self._waiting_count += 1
        sequence.preemptions += 1

    def charge(self, tenant: str, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        cost = PROMPT_TOKEN_COST * prompt_tokens + GENERATED_TOKEN_COST * generated_tokens
        self.served[tenant] = self.served.get(tenant, 0.0) + cost

    def all_waiting(self) -> Iterator[Sequence]:
        for queue in self.waiting.values():
            yield from queue
