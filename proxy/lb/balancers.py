"""Endpoint picks for a cluster: pure functions over the compiled endpoint list.

A balancer is built once per cluster per snapshot (weights expanded then), so a pick is a counter
bump or one random draw. `rand_below` is injected so tests are deterministic.
"""

from __future__ import annotations

import random
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
                  rand_below: Callable[[int], int] = random.randrange):
    return BALANCERS.get(lb_policy, RoundRobin)(endpoints, rand_below)
