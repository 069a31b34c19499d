"""Which replicas hold which customer's adapter: k copies each, not one on every replica.

Rendezvous (highest-random-weight) hashing ranks the replicas of a base for each customer
by a stable score of the pair; the customer takes the first ``k`` in that order. A replica
joining or leaving then moves only the copies it gains or loses, about 1/N of them, where
modulo hashing would reshuffle nearly everything and reload adapters fleet-wide.

Plain HRW leaves loads to chance, so each replica also has a cap, ``ceil(load_factor *
copies / N)``, as in "Consistent Hashing with Bounded Loads" (Mirrokni, Thorup and
Zadimoghaddam, 2018): a customer skips a full replica for its next choice. At the default
factor a replica must run 25% above the mean before the cap binds (small bases, many hot
customers); when it does, a few copies cascade to later choices, the price of no replica
running hot.

The first copy of each customer takes its traffic while it is not busy (the gateway keeps a
customer where its adapter is resident), so first copies are capped the same way: a
customer whose favourite replica already leads its cap's worth of customers leads from its
next copy instead. Which copy leads never moves an adapter.

Everything here is pure: the caller reads replicas and customers from the database, asks for
a placement, and turns ``changes`` into loads and unloads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from lora_ops.errors import InputError

DEFAULT_COPIES = 2
DEFAULT_LOAD_FACTOR = 1.25


def score(customer: str, url: str) -> int:
    """The pair's stable 64-bit weight; a customer ranks replicas by it, highest first.

    blake2b rather than ``hash``: Python salts string hashes per process, and every process
    that plans the fleet (CLI, flows, a replica restarting) must agree on the order.
    """
    digest = hashlib.blake2b(f"{customer}\0{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference(customer: str, urls: Iterable[str]) -> list[str]:
    """``urls`` in the customer's order of preference (the url breaks a 64-bit tie)."""
    return sorted(urls, key=lambda url: (-score(customer, url), url))


@dataclass(frozen=True)
class Change:
    """One customer's replica set moved: load on ``added``, then unload from ``removed``."""

    customer: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class Placement:
    """Where every customer's adapter lives.

    Attributes:
        assignment: customer -> its replicas, the leading copy first, then by preference
            (empty when unplaced).
        replicas: url -> base key, every replica planned for, holding customers or not.
        caps: base key -> the most copies one replica of that base may hold.
        unplaced: customers whose base has no replica, sorted.
    """

    assignment: Mapping[str, tuple[str, ...]]
    replicas: Mapping[str, str]
    caps: Mapping[str, int]
    unplaced: list[str]
    _held: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        held: dict[str, list[str]] = {url: [] for url in self.replicas}
        for customer in sorted(self.assignment):
            for url in self.assignment[customer]:
                held[url].append(customer)
        object.__setattr__(self, "_held", {url: tuple(names) for url, names in held.items()})

    def replicas_of(self, customer: str) -> list[str]:
        """The customer's replicas, the leading copy first; KeyError for a customer not planned."""
        return list(self.assignment[customer])

    def customers_of(self, url: str) -> list[str]:
        """The customers a replica holds, sorted; KeyError for a replica not planned."""
        return list(self._held[url])

    def total_copies(self) -> int:
        return sum(len(urls) for urls in self.assignment.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the fleet's report and ``--json`` output."""
        return {
            "customers": {c: list(urls) for c, urls in sorted(self.assignment.items())},
            "replicas": {url: list(self._held[url]) for url in sorted(self.replicas)},
            "caps": dict(sorted(self.caps.items())),
            "unplaced": list(self.unplaced),
        }


def place(
    customers: Mapping[str, str],
    replicas: Mapping[str, str],
    k: int = DEFAULT_COPIES,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    copies: Mapping[str, int] | None = None,
) -> Placement:
    """Give each customer ``k`` replicas of its base (hot customers more), deterministically.

    Bases are placed independently: a customer's adapter fits only its own base model, so one
    base's replicas and load never bear on another's.

    Args:
        customers: customer -> base key.
        replicas: replica url -> base key.
        k: copies per customer; a base with fewer replicas gives every replica.
        load_factor: a replica holds at most ``ceil(load_factor * copies / N)`` copies of its
            base's N replicas; 1 means perfectly even, higher means fewer cascades.
        copies: customer -> copies wanted, for hot customers (capped at N); others get ``k``.

    Returns:
        The placement; customers whose base has no replica are listed in ``unplaced``.

    Raises:
        InputError: ``k`` or ``load_factor`` below 1, or a ``copies`` entry below 1 or for a
            customer not in ``customers``.
    """
    wanted = _check_inputs(customers, k, load_factor, copies or {})
    assignment: dict[str, tuple[str, ...]] = {}
    caps: dict[str, int] = {}
    unplaced: list[str] = []
    urls_of = _group(replicas)
    for base, members in _group(customers).items():
        urls = sorted(urls_of.get(base, []))
        if not urls:
            unplaced.extend(members)
            assignment.update(dict.fromkeys(members, ()))
            continue
        counts = {c: min(wanted.get(c, k), len(urls)) for c in members}
        caps[base] = _cap(load_factor, sum(counts.values()), len(urls))
        assignment.update(_place_base(counts, urls, caps[base], load_factor))
    for base in urls_of.keys() - caps.keys():
        caps[base] = 0  # a base with replicas and no customers: nothing to hold
    return Placement(assignment, dict(replicas), caps, sorted(unplaced))


def changes(old: Placement, new: Placement) -> list[Change]:
    """What moves from ``old`` to ``new``, per customer whose replica set differs, sorted.

    ``added`` follows the new preference order and ``removed`` the old, so a caller that
    loads before it unloads brings up the copy that will serve most first.
    """
    moved: list[Change] = []
    for customer in sorted(set(old.assignment) | set(new.assignment)):
        before = old.assignment.get(customer, ())
        after = new.assignment.get(customer, ())
        if set(before) == set(after):
            continue
        added = tuple(url for url in after if url not in before)
        removed = tuple(url for url in before if url not in after)
        moved.append(Change(customer, added, removed))
    return moved


def moved_fraction(old: Placement, new: Placement) -> float:
    """Copies to load going from ``old`` to ``new``, as a share of the copies in ``new``.

    This is the cost of a fleet change in adapter downloads; 0.0 when ``new`` holds nothing.
    """
    total = new.total_copies()
    if total == 0:
        return 0.0
    return sum(len(change.added) for change in changes(old, new)) / total


def _check_inputs(
    customers: Mapping[str, str], k: int, load_factor: float, copies: Mapping[str, int]
) -> dict[str, int]:
    if k < 1:
        raise InputError(f"must be at least 1, got {k}", field="k")
    # `not >=` also refuses NaN; an infinite factor would leave no cap at all.
    if not (load_factor >= 1) or math.isinf(load_factor):
        raise InputError(
            f"must be a finite number of at least 1, got {load_factor}", field="load_factor"
        )
    for customer, count in copies.items():
        if customer not in customers:
            raise InputError(f"{customer!r} is not a customer being placed", field="copies")
        if count < 1:
            raise InputError(f"must be at least 1, got {count}", field=f"copies[{customer}]")
    return dict(copies)


def _group(by_name: Mapping[str, str]) -> dict[str, list[str]]:
    """Names per base key, bases in sorted order."""
    groups: dict[str, list[str]] = {}
    for name, base in by_name.items():
        groups.setdefault(base, []).append(name)
    return dict(sorted(groups.items()))


def _cap(load_factor: float, total: int, n: int) -> int:
    # Read the factor as the decimal it was written as: 1.1 in binary is a hair above 1.1,
    # and ceil would then add a copy of slack whenever 1.1 * total / n is a whole number.
    return math.ceil(Fraction(repr(load_factor)) * total / n)


def _order_key(customer: str) -> tuple[bytes, str]:
    """Customers are placed in hash order, so the input's order cannot change the outcome."""
    return hashlib.blake2b(customer.encode(), digest_size=8).digest(), customer


def _place_base(
    counts: Mapping[str, int], urls: list[str], cap: int, load_factor: float
) -> dict[str, tuple[str, ...]]:
    """Greedy bounded-load HRW over one base's replicas, repaired where the greedy sticks."""
    load = dict.fromkeys(urls, 0)
    held: dict[str, list[str]] = {}
    holders: dict[str, set[str]] = {url: set() for url in urls}
    for customer in sorted(counts, key=_order_key):
        mine = held[customer] = []
        for url in preference(customer, urls):
            if len(mine) == counts[customer]:
                break
            if load[url] < cap:
                mine.append(url)
                holders[url].add(customer)
                load[url] += 1
        while len(mine) < counts[customer]:
            _swap_in(customer, held, holders, load, cap)
    return _lead(held, urls, _cap(load_factor, len(counts), len(urls)))


def _lead(held: Mapping[str, list[str]], urls: list[str], cap: int) -> dict[str, tuple[str, ...]]:
    """Order each customer's replicas: the leading copy first, the others by preference.

    Leads are a matching of customers to one of their own copies with at most ``cap`` per
    replica (Kuhn's augmenting paths): a customer whose copies all lead ``cap`` customers
    takes the place of one that can lead from another of its copies. A customer for which
    no such chain exists keeps its first choice over the cap; the rest stay matched.
    """
    leaders: dict[str, list[str]] = {url: [] for url in urls}
    lead: dict[str, str] = {}

    def claim(customer: str, seen: set[str]) -> bool:
        for url in preference(customer, held[customer]):
            if url in seen:
                continue
            seen.add(url)
            if len(leaders[url]) < cap:
                leaders[url].append(customer)
                lead[customer] = url
                return True
            for other in sorted(leaders[url], key=lambda c: (score(c, url), c)):
                if claim(other, seen):  # moves `other` to another copy of its own
                    leaders[url].remove(other)
                    leaders[url].append(customer)
                    lead[customer] = url
                    return True
        return False

    for customer in sorted(held, key=_order_key):
        if not claim(customer, set()):
            lead[customer] = preference(customer, held[customer])[0]
            leaders[lead[customer]].append(customer)
    return {
        customer: (lead[customer], *(u for u in preference(customer, mine) if u != lead[customer]))
        for customer, mine in held.items()
    }


def _swap_in(
    customer: str,
    held: dict[str, list[str]],
    holders: dict[str, set[str]],
    load: dict[str, int],
    cap: int,
) -> None:
    """Give ``customer`` one more replica when every replica with room already holds it.

    The greedy can stick: with k distinct replicas per customer, the only replicas left with
    room may be ones this customer holds. One swap always frees a place. Let ``spare`` be a
    replica with room (it holds ``customer``, so at most ``cap - 2`` others) and ``full`` the
    customer's best replica it lacks (full, else the greedy would have taken it). At least
    two customers on ``full`` are not on ``spare``; the one that ranks ``spare`` highest moves
    there, and ``customer`` takes its place. No replica goes over the cap.
    """
    # Some replica has room: copies placed so far < total copies <= cap * N, as load_factor >= 1.
    spare = next(url for url in preference(customer, load) if load[url] < cap)
    full = next(url for url in preference(customer, load) if url not in held[customer])
    mover = max(holders[full] - holders[spare], key=lambda c: (score(c, spare), c))
    held[mover][held[mover].index(full)] = spare
    holders[full].remove(mover)
    holders[spare].add(mover)
    load[spare] += 1
    held[customer].append(full)
    holders[full].add(customer)
