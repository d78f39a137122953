"""Endpoint picks for a cluster: pure functions over the compiled endpoint list.

A balancer is built once per cluster per snapshot (weights expanded then), so a pick is a counter
bump or one random draw. `rand_below` is injected so tests are deterministic.
"""

from __future__ import annotations

import bisect
import random
from hashlib import blake2b
from math import gcd
from typing import Callable, Sequence

from proxy.config.snapshot import Endpoint


def _expand_weights(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Weighted round robin by repetition, interleaved so equal weights alternate (smooth enough for
    the small weights Istio users write; weights are divided by their gcd first)."""
    weights = [max(1, e.weight) for e in endpoints]
    g = 0
    for w in weights:
        g = gcd(g, w)
    weights = [w // g for w in weights]
    if all(w == 1 for w in weights):
        return tuple(endpoints)
    # interleave: round r takes every endpoint whose weight is still > r
    out: list[Endpoint] = []
    for r in range(max(weights)):
        for e, w in zip(endpoints, weights):
            if w > r:
                out.append(e)
    return tuple(out)


class RoundRobin:
    __slots__ = ("ring", "next_index")

    def __init__(self, endpoints: Sequence[Endpoint], rand_below: Callable[[int], int] = random.randrange) -> None:
        self.ring = _expand_weights(endpoints)
        # start at a random place so N workers do not all hit the first endpoint first
        self.next_index = rand_below(len(self.ring)) if self.ring else 0

    def pick(self, in_flight: Callable[[Endpoint], int] | None = None) -> Endpoint | None:
        ring = self.ring
        if not ring:
            return None
        i = self.next_index
        self.next_index = (i + 1) % len(ring)
        return ring[i]


class Random:
    __slots__ = ("ring", "rand_below")

    def __init__(self, endpoints: Sequence[Endpoint], rand_below: Callable[[int], int] = random.randrange) -> None:
        self.ring = _expand_weights(endpoints)
        self.rand_below = rand_below

    def pick(self, in_flight: Callable[[Endpoint], int] | None = None) -> Endpoint | None:
        if not self.ring:
            return None
        return self.ring[self.rand_below(len(self.ring))]


class LeastRequest:
    """Power of two choices on the number of requests in flight (Envoy's default LEAST_REQUEST)."""

    __slots__ = ("ring", "rand_below")

    def __init__(self, endpoints: Sequence[Endpoint], rand_below: Callable[[int], int] = random.randrange) -> None:
        self.ring = _expand_weights(endpoints)
        self.rand_below = rand_below

    def pick(self, in_flight: Callable[[Endpoint], int] | None = None) -> Endpoint | None:
        ring = self.ring
        if not ring:
            return None
        a = ring[self.rand_below(len(ring))]
        if in_flight is None or len(ring) == 1:
            return a
        b = ring[self.rand_below(len(ring))]
        return b if in_flight(b) < in_flight(a) else a


BALANCERS = {
    "ROUND_ROBIN": RoundRobin,
    "UNSPECIFIED": RoundRobin,
    "RANDOM": Random,
    "LEAST_REQUEST": LeastRequest,
    "LEAST_CONN": LeastRequest,  # Istio's deprecated alias
}


def make_balancer(lb_policy: str, endpoints: Sequence[Endpoint],
                  rand_below: Callable[[int], int] = random.randrange, consistent_hash=None):
    """The balancer for a cluster's (healthy) endpoints. `consistent_hash`: a snapshot ConsistentHash."""
    if consistent_hash is not None:
        if consistent_hash.ring == "maglev":
            return Maglev(endpoints, consistent_hash.ring_size, rand_below)
        return RingHash(endpoints, consistent_hash.ring_size, rand_below)
    return BALANCERS.get(lb_policy, RoundRobin)(endpoints, rand_below)


# --------------------------------------------------------------------------------------------------
# consistent hashing (DestinationRule loadBalancer.consistentHash)


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (same in every worker process and run, unlike Python's hash())."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def _host_key(e: Endpoint) -> bytes:
    return f"{e.address}:{e.port}".encode()


class RingHash:
    """Ketama-style ring: every endpoint owns `ceil(ring_size * weight / total)` points at the hashes
    of "address:port_i"; a key belongs to the first point at or after its hash (wrapping). A retry
    that must avoid hosts already tried walks on along the ring to the next other host."""

    __slots__ = ("points", "hosts", "distinct", "rand_below")

    def __init__(self, endpoints: Sequence[Endpoint], ring_size: int = 1024,
                 rand_below: Callable[[int], int] = random.randrange) -> None:
        self.rand_below = rand_below
        total = sum(max(1, e.weight) for e in endpoints) or 1
        ring: list[tuple[int, int]] = []
        for idx, e in enumerate(endpoints):
            replicas = -(-ring_size * max(1, e.weight) // total)
            key = _host_key(e)
            for i in range(replicas):
                ring.append((hash64(key + b"_%d" % i), idx))
        ring.sort()
        self.points = [h for h, _ in ring]
        self.hosts = [endpoints[i] for _, i in ring]
        self.distinct = len(endpoints)

    def pick_hash(self, h: int | None, avoid=None) -> Endpoint | None:
        hosts = self.hosts
        if not hosts:
            return None
        i = bisect.bisect_left(self.points, h) if h is not None else self.rand_below(len(hosts))
        n = len(hosts)
        e = hosts[i % n]
        if avoid and self.distinct > 1:
            for step in range(1, n):
                if e not in avoid:
                    break
                e = hosts[(i + step) % n]
        return e

    def pick(self, in_flight=None) -> Endpoint | None:
        return self.pick_hash(None)


class Maglev:
    """Maglev lookup table (Eisenbud et al., 2016): each endpoint fills table slots in its own
    permutation order (offset, skip from two hashes of its name), weighted by repeating turns, so
    every key maps to one slot and a host-set change moves few keys."""

    __slots__ = ("table", "distinct", "rand_below")

    def __init__(self, endpoints: Sequence[Endpoint], table_size: int = 65537,
                 rand_below: Callable[[int], int] = random.randrange) -> None:
        self.rand_below = rand_below
        self.distinct = len(endpoints)
        key = (tuple(endpoints), table_size)
        cached = _MAGLEV_TABLES.get(key)
        if cached is None:
            cached = _maglev_table(endpoints, table_size)
            if len(_MAGLEV_TABLES) >= _MAGLEV_CACHE_MAX:
                _MAGLEV_TABLES.pop(next(iter(_MAGLEV_TABLES)))
            _MAGLEV_TABLES[key] = cached
        self.table = cached

    def pick_hash(self, h: int | None, avoid=None) -> Endpoint | None:
        table = self.table
        if not table:
            return None
        n = len(table)
        i = h % n if h is not None else self.rand_below(n)
        e = table[i]
        if avoid and self.distinct > 1:
            for step in range(1, n):
                if e not in avoid:
                    break
                e = table[(i + step) % n]
        return e

    def pick(self, in_flight=None) -> Endpoint | None:
        return self.pick_hash(None)


# Filling a table costs ~50 ms in Python for the default 65537 slots; host sets repeat (an ejection
# and the return from it), so tables are kept for the last few sets.
_MAGLEV_CACHE_MAX = 32
_MAGLEV_TABLES: dict = {}


def _maglev_table(endpoints: Sequence[Endpoint], m: int) -> list:
    table: list = [None] * m
    if endpoints:
        perms = []
        for e in endpoints:
            key = _host_key(e)
            offset = hash64(b"o" + key) % m
            skip = hash64(b"s" + key) % (m - 1) + 1 if m > 1 else 1
            perms.append([offset, skip, 0])
        weights = [max(1, e.weight) for e in endpoints]
        filled = 0
        while filled < m:
            for idx, e in enumerate(endpoints):
                for _ in range(weights[idx]):
                    p = perms[idx]
                    slot = (p[0] + p[2] * p[1]) % m
                    while table[slot] is not None:
                        p[2] += 1
                        slot = (p[0] + p[2] * p[1]) % m
                    table[slot] = e
                    p[2] += 1
                    filled += 1
                    if filled == m:
                        break
                if filled == m:
                    break
    return table if endpoints else []

