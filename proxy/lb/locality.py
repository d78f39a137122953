"""Envoy's priority levels and locality weights over a cluster's healthy endpoints, for
DestinationRule localityLbSetting (the groups come compiled: proxy/config/locality.py).

Theory of operation (Envoy's load balancing: priority levels, locality weighted).
- A level's health is the share of its endpoint weight that is healthy, times the overprovisioning
  factor 1.4, capped at 100 %. Levels take load in priority order, each as much as its health
  allows of what is left, the health values normalized when they sum to less than 100; so a level
  keeps all traffic while at least 1/1.4 (~72 %) of it is healthy, and spills the rest over to the
  next level as it loses endpoints. With no healthy endpoint anywhere, priority 0 takes everything
  (Envoy's panic).
- Within a level, `distribute` picks a locality by its weight times its availability (healthy share
  times 1.4, at most 1), then an endpoint by the cluster's balancer over that locality; failover
  balances over every healthy endpoint of the level.
Built again whenever the set of healthy endpoints changes (an outlier ejection or return), so a
pick is one or two draws and the inner balancer's pick. Pure: `rand_below` is injected.
"""

from __future__ import annotations

import bisect
from typing import Callable, Collection, Sequence

from proxy.config.snapshot import Endpoint, LocalityLb
from proxy.lb.balancers import make_balancer

OVERPROVISIONING = 1.4  # Envoy's default overprovisioning_factor (140 %)


def _weight(endpoints: Sequence[Endpoint]) -> int:
    return sum(max(1, e.weight) for e in endpoints)


class _Level:
    """One priority level: its health, and how it picks among its healthy endpoints."""

    __slots__ = ("health", "balancer", "localities", "cumulative")

    def __init__(self, groups, healthy: Collection[Endpoint], lb_policy: str, rand_below, consistent_hash,
                 weighted: bool) -> None:
        total = sum(_weight(g.endpoints) for g in groups)
        live = [(g, [e for e in g.endpoints if e in healthy]) for g in groups]
        live_weight = sum(_weight(eps) for _, eps in live)
        self.health = min(100, int(OVERPROVISIONING * 100 * live_weight / total)) if total else 0
        everyone = [e for _, eps in live for e in eps]
        self.balancer = make_balancer(lb_policy, everyone, rand_below, consistent_hash)
        self.localities: list = []
        self.cumulative: list[int] = []
        if weighted and consistent_hash is None:
            acc = 0
            for g, eps in live:
                availability = min(1.0, OVERPROVISIONING * _weight(eps) / _weight(g.endpoints)) if eps else 0.0
                effective = int(g.weight * availability * 1000)  # thousandths: no locality rounds to 0 early
                if effective > 0:
                    acc += effective
                    self.localities.append(make_balancer(lb_policy, eps, rand_below))
                    self.cumulative.append(acc)

    def pick(self, in_flight, rand_below) -> Endpoint | None:
        if self.cumulative:
            i = bisect.bisect_right(self.cumulative, rand_below(self.cumulative[-1]))
            return self.localities[i].pick(in_flight)
        return self.balancer.pick(in_flight)


class LocalityBalancer:
    """The balancer of a cluster with locality load balancing: same `pick`/`pick_hash` as the others."""

    __slots__ = ("levels", "load", "rand_below")

    def __init__(self, lb: LocalityLb, healthy: Collection[Endpoint], lb_policy: str,
                 rand_below: Callable[[int], int], consistent_hash=None) -> None:
        healthy = set(healthy)
        priorities = sorted({g.priority for g in lb.groups})
        self.rand_below = rand_below
        self.levels = [
            _Level([g for g in lb.groups if g.priority == p], healthy, lb_policy, rand_below, consistent_hash,
                   weighted=lb.mode == "distribute")
            for p in priorities
        ]
        self.load = _cumulative_load([level.health for level in self.levels])

    def _level(self, draw: int) -> _Level:
        return self.levels[bisect.bisect_right(self.load, draw)]

    def pick(self, in_flight: Callable[[Endpoint], int] | None = None) -> Endpoint | None:
        if not self.levels:
            return None
        level = self.levels[0] if len(self.levels) == 1 else self._level(self.rand_below(100))
        return level.pick(in_flight, self.rand_below)

    def pick_hash(self, h: int | None, avoid=None) -> Endpoint | None:
        """consistentHash: the hash chooses the level too (as Envoy's hashing balancers do), then
        the level's ring."""
        if not self.levels:
            return None
        draw = (h if h is not None else self.rand_below(1 << 32)) % 100
        return self._level(draw).balancer.pick_hash(h, avoid)


def _cumulative_load(health: list[int]) -> list[int]:
    """Per-level load in percent, cumulative (the last is 100): each level takes what its health
    allows of what is left; health summing under 100 is scaled up; no health at all: level 0."""
    total = min(100, sum(health))
    if total == 0:
        return [100] * len(health)
    out, acc, left = [], 0, 100
    for h in health:
        take = min(left, h * 100 // total)
        left -= take
        acc += take
        out.append(acc)
    if left:  # rounding: the remainder goes to the first level that has health
        first = next(i for i, h in enumerate(health) if h)
        out = [v + left if i >= first else v for i, v in enumerate(out)]
    return out
