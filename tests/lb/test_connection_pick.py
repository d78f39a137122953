"""TCP routes pick endpoints through the same ClusterRuntime.pick as HTTP requests and mirrors:
consistent hashing on the source IP, PASSTHROUGH to the original destination, and outlier ejections."""

from __future__ import annotations

from proxy.config.snapshot import Cluster, ConsistentHash, Endpoint, OutlierPolicy
from proxy.l7.dataplane import ClusterRuntime, ConnectionPick
from proxy.stats import Stats

ENDPOINTS = tuple(Endpoint("10.0.0.%d" % i, 5432) for i in range(1, 6))


def _runtime(**fields) -> ClusterRuntime:
    cluster = Cluster(name="outbound|5432||db", service_host="db", port=5432, subset="", endpoints=ENDPOINTS,
                      **fields)
    return ClusterRuntime(cluster, Stats(), clock=lambda: 0.0, rand_below=lambda n: 0)


def test_source_ip_hash_is_sticky_per_client() -> None:
    crt = _runtime(lb_policy="RING_HASH", consistent_hash=ConsistentHash(source="source_ip"))
    picks = {ip: crt.pick(ConnectionPick(ip, None), lambda e: 0) for ip in (b"10.1.0.1", b"10.1.0.2", b"10.1.0.3")}
    for ip, first in picks.items():
        assert all(crt.pick(ConnectionPick(ip, None), lambda e: 0) == first for _ in range(20))
    # a header hash has nothing to hash on a TCP connection: still a valid endpoint, never an error
    crt = _runtime(lb_policy="RING_HASH", consistent_hash=ConsistentHash(source="header", name=b"x-user"))
    assert crt.pick(ConnectionPick(b"10.1.0.1", None), lambda e: 0) in ENDPOINTS


def test_passthrough_goes_to_the_original_destination() -> None:
    crt = _runtime(lb_policy="PASSTHROUGH")
    assert crt.pick(ConnectionPick(b"10.1.0.1", ("10.9.9.9", 7000)), lambda e: 0) == Endpoint("10.9.9.9", 7000)


def test_connect_failures_eject_the_endpoint_from_tcp_picks() -> None:
    crt = _runtime(outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100))
    bad = ENDPOINTS[0]
    crt.record(bad, 503, True)  # what the transparent listener records for a connect failure
    picks = {crt.pick(ConnectionPick(b"10.1.0.1", None), lambda e: 0) for _ in range(50)}
    assert bad not in picks and picks <= set(ENDPOINTS[1:])
