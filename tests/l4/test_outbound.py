"""Outbound policy: known service -> route; unknown -> ALLOW_ANY passthrough / REGISTRY_ONLY refuse."""

from __future__ import annotations

from proxy.l4.addrs import OrigDstAddr
from proxy.l4.outbound import (
    PASSTHROUGH,
    REFUSE,
    OutboundTrafficPolicyMode,
    Route,
    ServiceTable,
    decide_outbound,
)

TABLE = ServiceTable.of(
    {
        ("10.96.0.10", 9080): "reviews.default.svc.cluster.local",
        ("10.244.1.7", 9080): "reviews.default.svc.cluster.local",  # an endpoint address
        ("fd00::a", 80): "ratings.default.svc.cluster.local",
        ("*", 27017): "mongo.db.svc.cluster.local",
    }
)


def test_known_vip_and_endpoint_route_to_the_service() -> None:
    for dst in (OrigDstAddr("10.96.0.10", 9080), OrigDstAddr("10.244.1.7", 9080)):
        for mode in OutboundTrafficPolicyMode:
            assert decide_outbound(dst, TABLE, mode) == Route("reviews.default.svc.cluster.local")
    assert decide_outbound(OrigDstAddr("fd00::a", 80), TABLE) == Route("ratings.default.svc.cluster.local")


def test_port_only_entry_matches_any_address() -> None:
    assert decide_outbound(OrigDstAddr("10.1.2.3", 27017), TABLE) == Route("mongo.db.svc.cluster.local")


def test_unknown_destination_follows_the_mode() -> None:
    unknown = OrigDstAddr("93.184.216.34", 443)
    same_ip_other_port = OrigDstAddr("10.96.0.10", 9081)
    for dst in (unknown, same_ip_other_port):
        assert decide_outbound(dst, TABLE) is PASSTHROUGH  # Istio's default is ALLOW_ANY
        assert decide_outbound(dst, TABLE, OutboundTrafficPolicyMode.ALLOW_ANY) is PASSTHROUGH
        assert decide_outbound(dst, TABLE, OutboundTrafficPolicyMode.REGISTRY_ONLY) is REFUSE


def test_empty_table() -> None:
    dst = OrigDstAddr("10.96.0.10", 9080)
    assert decide_outbound(dst, ServiceTable()) is PASSTHROUGH
    assert decide_outbound(dst, ServiceTable(), OutboundTrafficPolicyMode.REGISTRY_ONLY) is REFUSE
    assert PASSTHROUGH.value == "PassthroughCluster" and REFUSE.value == "BlackHoleCluster"
