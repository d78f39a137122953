"""LocalityBalancer: Envoy's priority spillover (overprovisioning 1.4) and locality weights, with
deterministic draws (every value of a draw's range taken in turn)."""

from __future__ import annotations

from collections import Counter

from proxy.config.snapshot import ConsistentHash, Endpoint, LocalityGroup, LocalityLb
from proxy.lb.balancers import hash64
from proxy.lb.locality import LocalityBalancer, _cumulative_load

A1, A2 = Endpoint("10.0.0.1", 80, locality="r/a"), Endpoint("10.0.0.2", 80, locality="r/a")
B1 = Endpoint("10.0.1.1", 80, locality="r/b")
C1 = Endpoint("10.0.2.1", 80, locality="s/c")
FAILOVER = LocalityLb("failover", (LocalityGroup("r/a", 0, 0, (A1, A2)), LocalityGroup("r/b", 1, 0, (B1,)),
                                   LocalityGroup("s/c", 2, 0, (C1,))))


class Sweep:
    """rand_below that walks 0, 1, 2, ... n-1 for each n: a full sweep shows exact proportions."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}

    def __call__(self, n: int) -> int:
        v = self.next.get(n, 0)
        self.next[n] = (v + 1) % n
        return v


def _share(lb: LocalityBalancer, picks: int) -> Counter:
    return Counter(lb.pick() for _ in range(picks))


def test_cumulative_load():
    assert _cumulative_load([100, 100]) == [100, 100]
    assert _cumulative_load([70, 100]) == [70, 100]
    assert _cumulative_load([0, 0, 100]) == [0, 0, 100]
    assert _cumulative_load([35, 35]) == [50, 100], "health under 100 in total is scaled up"
    assert _cumulative_load([0, 0]) == [100, 100], "nothing healthy: priority 0 takes it all (panic)"


def test_all_healthy_stays_in_priority_zero():
    lb = LocalityBalancer(FAILOVER, {A1, A2, B1, C1}, "ROUND_ROBIN", Sweep())
    assert _share(lb, 200) == Counter({A1: 100, A2: 100})


def test_half_of_priority_zero_ejected_spills_thirty_percent():
    # priority 0 keeps 1 of 2 endpoints: health min(100, 1.4 * 50) = 70 %, the rest goes to priority 1
    lb = LocalityBalancer(FAILOVER, {A2, B1, C1}, "ROUND_ROBIN", Sweep())
    assert _share(lb, 100) == Counter({A2: 70, B1: 30})


def test_whole_priorities_ejected_fail_over_in_order():
    assert _share(LocalityBalancer(FAILOVER, {B1, C1}, "ROUND_ROBIN", Sweep()), 100) == Counter({B1: 100})
    assert _share(LocalityBalancer(FAILOVER, {C1}, "RANDOM", Sweep()), 100) == Counter({C1: 100})
    assert LocalityBalancer(FAILOVER, set(), "ROUND_ROBIN", Sweep()).pick() is None


def test_distribute_weights_and_availability():
    lb_setting = LocalityLb("distribute", (LocalityGroup("r/a", 0, 80, (A1, A2)), LocalityGroup("r/b", 0, 20, (B1,))))
    # weights are kept in thousandths: one sweep of the draw is 100,000 picks
    share = _share(LocalityBalancer(lb_setting, {A1, A2, B1}, "ROUND_ROBIN", Sweep()), 100_000)
    assert (share[A1], share[A2], share[B1]) == (40_000, 40_000, 20_000)
    # r/a at half health is available min(1, 1.4 * 0.5) = 0.7: weight 56 against 20
    lb = LocalityBalancer(lb_setting, {A1, B1}, "ROUND_ROBIN", Sweep())
    share = _share(lb, 76_000)
    assert (share[A1], share[B1]) == (56_000, 20_000)


def test_consistent_hash_is_sticky_within_the_chosen_priority():
    ring = ConsistentHash(source="header", name=b"x-user")
    lb = LocalityBalancer(FAILOVER, {A1, A2, B1, C1}, "ROUND_ROBIN", Sweep(), ring)
    picks = {k: lb.pick_hash(hash64(b"u%d" % k)) for k in range(200)}
    assert set(picks.values()) == {A1, A2}
    assert all(lb.pick_hash(hash64(b"u%d" % k)) == e for k, e in picks.items())
