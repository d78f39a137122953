"""Outlier detection as a pure state machine with an injected clock."""

from __future__ import annotations

from proxy.config.snapshot import OutlierPolicy
from proxy.lb.outlier import OutlierDetector

HOSTS = ("a", "b", "c", "d")


def _det(**kw) -> OutlierDetector:
    policy = OutlierPolicy(**{"consecutive_5xx": 3, "interval_s": 1.0, "base_ejection_time_s": 10.0,
                              "max_ejection_percent": 100, **kw})
    return OutlierDetector(HOSTS, policy, now=0.0)


def test_consecutive_5xx_ejects_and_a_success_resets_the_count():
    d = _det()
    assert not d.record("a", 503, 0.1)
    assert not d.record("a", 500, 0.2)
    assert not d.record("a", 200, 0.3)
    assert not d.record("a", 503, 0.4) and not d.record("a", 503, 0.5)
    assert d.record("a", 502, 0.6)
    assert d.is_ejected("a") and d.healthy() == ("b", "c", "d")
    assert d.ejections_total == 1 and d.version == 1


def test_ejected_host_returns_at_the_first_sweep_after_its_time_and_time_grows():
    d = _det()
    for _ in range(3):
        d.record("a", 503, 0.0)
    assert d.sweep(9.9) == 0 and d.is_ejected("a")
    assert d.sweep(10.0) == 1 and not d.is_ejected("a")
    assert d.healthy() == HOSTS
    for _ in range(3):
        d.record("a", 503, 10.5)
    # second ejection in a row: 2 x base
    assert d.sweep(29.0) == 0 and d.is_ejected("a")
    assert d.sweep(30.5) == 1


def test_multiplier_decays_while_healthy():
    d = _det()
    for _ in range(3):
        d.record("a", 503, 0.0)
    d.sweep(10.0)
    for t in range(11, 14):
        d.sweep(float(t))  # healthy intervals bring the multiplier back to 0
    for _ in range(3):
        d.record("a", 503, 14.0)
    assert d.sweep(23.9) == 0 and d.sweep(24.0) == 1, "back to 1 x base"


def test_gateway_errors_only_when_enabled():
    d = _det(consecutive_5xx=0, consecutive_gateway=2)
    assert not d.record("a", 500, 0) and not d.record("a", 500, 0) and not d.record("a", 500, 0)
    assert not d.record("a", 503, 0)
    assert d.record("a", 504, 0)


def test_max_ejection_percent_allows_at_least_one_host():
    d = _det(max_ejection_percent=10)
    for h in ("a", "b"):
        for _ in range(3):
            d.record(h, 503, 0)
    assert d.is_ejected("a") and not d.is_ejected("b")
    d = _det(max_ejection_percent=50)
    for h in ("a", "b", "c"):
        for _ in range(3):
            d.record(h, 503, 0)
    assert [d.is_ejected(h) for h in HOSTS] == [True, True, False, False]


def test_min_health_percent_falls_back_to_all_hosts():
    d = _det(min_health_percent=60)
    for _ in range(3):
        d.record("a", 503, 0)
    assert d.healthy() == ("b", "c", "d")  # 75 % healthy
    for _ in range(3):
        d.record("b", 503, 0)
    assert d.healthy() == HOSTS  # 50 % < 60 %: panic, balance over everything


def test_consecutive_5xx_zero_disables():
    d = _det(consecutive_5xx=0)
    assert not any(d.record("a", 503, 0) for _ in range(100))


def test_split_local_origin_errors_count_on_their_own():
    d = _det(split_local_origin=True, consecutive_local_origin=2)
    assert not d.record("a", 503, 0, local=True)
    assert not d.record("a", 200, 0), "an answer resets the local-origin count"
    assert not d.record("a", 503, 0, local=True)
    assert d.record("a", 503, 0, local=True)
    d = _det(split_local_origin=True, consecutive_local_origin=5)
    for _ in range(4):
        d.record("b", 503, 0, local=True)
    assert not d.is_ejected("b"), "local failures no longer count as 5xx"
    unsplit = _det()
    assert not unsplit.record("c", 503, 0, local=True) and not unsplit.record("c", 504, 0, local=True)
    assert unsplit.record("c", 503, 0, local=True), "without the split they are 5xx"
