"""DestinationRule loadBalancer.localityLbSetting compiled for one proxy (Istio's rules): the proxy's
locality from its labels, failover priorities, distribute weights, validation."""

from __future__ import annotations

import json

import pytest

from proxy.config.errors import ConfigError
from proxy.config.locality import locality_matches, proxy_locality
from tests.config.helpers import compile_docs, doc

HOST = "svc.example.com"
CLUSTER = f"outbound|80||{HOST}"
OUTLIER = {"consecutive5xxErrors": 1}


def _service(*localities: str) -> dict:
    return doc("ServiceEntry", "svc", {
        "hosts": [HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": f"10.0.0.{i + 1}", "locality": loc} for i, loc in enumerate(localities)],
    })


def _rule(**traffic_policy) -> dict:
    return doc("DestinationRule", "svc", {"host": HOST, "trafficPolicy": traffic_policy})


def _lb(snap):
    return snap.clusters[CLUSTER].locality_lb


def _priorities(snap) -> dict[str, int]:
    return {g.locality: g.priority for g in _lb(snap).groups}


ME = {"istio-locality": "us-west.zone1.sub1"}


def test_proxy_locality_from_labels():
    assert proxy_locality(ME) == "us-west/zone1/sub1"
    assert proxy_locality({"istio-locality": "us-west/zone1"}) == "us-west/zone1"
    assert proxy_locality({"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1"}) == "eu/eu-1"
    assert proxy_locality({"app": "x"}) == proxy_locality(None) == ""


@pytest.mark.parametrize("pattern, locality, hit", [
    ("us-west", "us-west/zone1/sub1", True), ("us-west/*", "us-west/zone2", True), ("*", "eu/z", True),
    ("us-west/zone1/*", "us-west/zone1/sub9", True), ("us-west/zone1", "us-west/zone2/sub1", False),
    ("us-east", "us-west/zone1", False), ("us-west/zone1/sub1", "us-west/zone1/sub1", True),
])
def test_locality_patterns(pattern, locality, hit):
    assert locality_matches(locality, pattern) is hit


def test_default_failover_needs_outlier_detection_and_orders_by_closeness():
    svc = _service("us-west/zone1/sub1", "us-west/zone1/sub2", "us-west/zone2/sub1", "us-east/zone1/sub1")
    assert _lb(compile_docs(svc, _rule(), proxy_labels=ME)) is None, "no outlierDetection: no failover (Istio)"
    snap = compile_docs(svc, _rule(outlierDetection=OUTLIER), proxy_labels=ME)
    assert _lb(snap).mode == "failover"
    assert _priorities(snap) == {"us-west/zone1/sub1": 0, "us-west/zone1/sub2": 1, "us-west/zone2/sub1": 2,
                                 "us-east/zone1/sub1": 3}


def test_failover_region_and_dense_priorities():
    svc = _service("us-west/zone1", "eu-west/zone1", "us-east/zone1")
    setting = {"localityLbSetting": {"failover": [{"from": "us-west", "to": "us-east"}]}}
    snap = compile_docs(svc, _rule(outlierDetection=OUTLIER, loadBalancer=setting),
                        proxy_labels={"istio-locality": "us-west.zone1"})
    # 0 same zone, then us-east (3), then other regions (4): renumbered 0, 1, 2
    assert _priorities(snap) == {"us-west/zone1": 0, "us-east/zone1": 1, "eu-west/zone1": 2}


def test_one_priority_or_disabled_changes_nothing():
    same = _service("us-west/zone1/sub1", "us-west/zone1/sub1")
    assert _lb(compile_docs(same, _rule(outlierDetection=OUTLIER), proxy_labels=ME)) is None
    mixed = _service("us-west/zone1/sub1", "us-east/zone1")
    off = _rule(outlierDetection=OUTLIER, loadBalancer={"localityLbSetting": {"enabled": False}})
    assert _lb(compile_docs(mixed, off, proxy_labels=ME)) is None


def test_distribute_weights_shared_by_pattern_and_unmatched_localities_dropped():
    svc = _service("us-west/zone1/a", "us-west/zone2/a", "us-west/zone2/b", "us-west/zone2/b", "eu/z1")
    setting = {"localityLbSetting": {"distribute": [
        {"from": "eu/*", "to": {"eu/*": 100}},
        {"from": "us-west/zone1/*", "to": {"us-west/zone1/*": 70, "us-west/zone2/*": 30}},
    ]}}
    snap = compile_docs(svc, _rule(loadBalancer=setting), proxy_labels=ME)
    lb = _lb(snap)
    assert lb.mode == "distribute"
    # zone2's 30 is shared by its localities by endpoint weight (1 and 2 of 3), rounded up; eu gets none
    assert {g.locality: (g.weight, len(g.endpoints)) for g in lb.groups} == {
        "us-west/zone1/a": (70, 1), "us-west/zone2/a": (10, 1), "us-west/zone2/b": (20, 2)}
    dumped = json.loads(json.dumps(snap.dump))
    (cluster,) = [c for c in dumped["clusters"] if c["name"] == CLUSTER]
    assert cluster["locality_lb"]["mode"] == "distribute"
    assert [[g["locality"] for g in level] for level in cluster["locality_lb"]["priorities"]] == [
        ["us-west/zone1/a", "us-west/zone2/a", "us-west/zone2/b"]]
    # a proxy no `from` matches: no change
    assert _lb(compile_docs(svc, _rule(loadBalancer=setting), proxy_labels={"istio-locality": "ap/z"})) is None


def test_subset_policy_applies_to_its_cluster():
    svc = _service("us-west/zone1/sub1", "us-east/zone1")
    rule = doc("DestinationRule", "svc", {"host": HOST, "subsets": [
        {"name": "all", "labels": {}, "trafficPolicy": {"outlierDetection": OUTLIER}}]})
    snap = compile_docs(svc, rule, proxy_labels=ME)
    assert snap.clusters[CLUSTER].locality_lb is None
    assert snap.clusters[f"outbound|80|all|{HOST}"].locality_lb.mode == "failover"


@pytest.mark.parametrize("setting, message", [
    ({"distribute": [{"from": "a/*", "to": {"a/*": 60, "b/*": 30}}]}, "total locality weight 90 != 100"),
    ({"distribute": [{"from": "a", "to": {"a": 100}}], "failover": [{"from": "a", "to": "b"}]},
     "cannot set both `distribute` and `failover`"),
    ({"failover": [{"from": "a", "to": "a"}]}, "two different regions"),
    ({"failover": [{"from": "a/z", "to": "b"}]}, "regions only"),
    ({"failover": [{"from": "a", "to": "*"}]}, "cannot contain the wildcard"),
    ({"distribute": [{"from": "a/*/z", "to": {"a": 100}}]}, "may only be the whole last segment"),
    ({"distribute": [{"from": "a", "to": {"a": 0, "b": 100}}]}, "must be in [1, 100]"),
])
def test_invalid_settings_name_the_field(setting, message):
    with pytest.raises(ConfigError) as info:
        compile_docs(_service("a/z"), _rule(loadBalancer={"localityLbSetting": setting}))
    assert message in str(info.value)
    assert "$.spec.trafficPolicy.loadBalancer.localityLbSetting" in str(info.value)


def test_failover_priority_is_refused_as_not_supported_yet():
    with pytest.raises(ConfigError) as info:
        compile_docs(_service("a/z"), _rule(loadBalancer={"localityLbSetting": {"failoverPriority": ["topology.kubernetes.io/zone"]}}))
    assert "failoverPriority" in str(info.value) and "does not support yet" in str(info.value)
