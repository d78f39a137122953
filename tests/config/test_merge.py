"""Merged rules and per-namespace names, as Istio has them: several DestinationRules per host, the
same short host in several namespaces, gateway VirtualServices merged, mesh ones not."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.load import load_path
from tests.config.helpers import compile_docs, doc, head, route_for, service

CORPUS = Path(__file__).parent / "corpus" / "merge"
TUTORIAL_CUSTOMER = "outbound|8080||customer.tutorial.svc.cluster.local"
DEFAULT_CUSTOMER = "outbound|8080||customer.default.svc.cluster.local"


def corpus(proxy_namespace: str | None = "tutorial"):
    resources = load_path(CORPUS) + load_path(CORPUS / "workloads")
    return compile_resources(resources, version="t", bind_address="127.0.0.1", proxy_namespace=proxy_namespace)


def _cluster(route) -> str | None:
    return None if route is None else route.destinations[0].cluster


def _dr(name: str, host: str, namespace: str | None = None, **spec) -> dict:
    return doc("DestinationRule", name, {"host": host, **spec}, namespace)


def _subset(name: str, version: str, **kw) -> dict:
    return {"name": name, "labels": {"version": version}, **kw}


def _lb(simple: str) -> dict:
    return {"loadBalancer": {"simple": simple}}


# ---- the corpus


def test_corpus_destination_rules_merge_subsets_first_definition_and_first_policy_win():
    snap = corpus()
    subsets = {c.subset: c for c in snap.clusters.values() if c.service_host == "recommendation"}
    assert set(subsets) == {"", "version-v1", "version-v2", "version-v3"}  # from three rules in three files
    # version-v1 is defined twice: recommendation-v1 (first file) keeps it, labels version=v1
    assert [e.port for e in subsets["version-v1"].endpoints] == [9111]
    # the top-level trafficPolicy of the first rule that sets one (recommendation-v2), not v3's RANDOM
    assert subsets[""].lb_policy == "LEAST_REQUEST"
    assert subsets[""].connection_pool.max_pending_requests == 10
    assert subsets["version-v3"].lb_policy == "LEAST_REQUEST"
    assert subsets["version-v2"].lb_policy == "ROUND_ROBIN"  # its own subset policy still overrides


def test_corpus_same_short_host_in_two_namespaces_gets_two_clusters():
    snap = corpus()
    assert [e.port for e in snap.clusters[DEFAULT_CUSTOMER].endpoints] == [9101]
    assert [e.port for e in snap.clusters[TUTORIAL_CUSTOMER].endpoints] == [9102]
    # neither namespace has a rule for customer: the root namespace's wildcard rule applies to both
    assert snap.clusters[DEFAULT_CUSTOMER].lb_policy == snap.clusters[TUTORIAL_CUSTOMER].lb_policy == "RANDOM"


def test_corpus_gateway_virtual_services_merge_and_names_resolve_in_their_namespace():
    snap = corpus()
    gw = "127.0.0.1_8080"  # both Gateways' servers on one listener
    shop = b"shop.example.com"
    assert _cluster(route_for(snap, gw, head(b"/customer/1", authority=shop))) == TUTORIAL_CUSTOMER
    assert _cluster(route_for(snap, gw, head(b"/recommendation/v3", authority=shop))) == "outbound|8080|version-v3|recommendation"
    assert _cluster(route_for(snap, gw, head(b"/recommendation", authority=shop))) == "outbound|8080|version-v1|recommendation"
    assert _cluster(route_for(snap, gw, head(b"/", authority=b"legacy.example.com"))) == DEFAULT_CUSTOMER
    vhost = next(v for l in snap.dump["listeners"] if l["name"] == gw for v in l["virtual_hosts"] if v["name"] == "shop.example.com")
    assert [r["virtual_service"] for r in vhost["routes"]] == ["tutorial/shop-customer"] + ["tutorial/shop-recommendation"] * 3


def test_corpus_sidecar_names_resolve_in_the_sidecar_namespace_first():
    for namespace, name, own, other in (("default", "127.0.0.1_15001", DEFAULT_CUSTOMER, TUTORIAL_CUSTOMER),
                                        ("tutorial", "127.0.0.1_15002", TUTORIAL_CUSTOMER, DEFAULT_CUSTOMER)):
        snap = corpus(namespace)  # a workload of that namespace: its namespace's Sidecar, as Istio picks it
        assert [lst.name for lst in snap.listeners if lst.name.startswith("127.0.0.1_1500")] == [name]
        assert _cluster(route_for(snap, name, head(authority=b"customer"))) == own, name
        assert _cluster(route_for(snap, name, head(authority=b"customer:8080"))) == own, name
        # the other namespace's service stays reachable by its qualified names
        other_ns = other.split(".")[1]
        assert _cluster(route_for(snap, name, head(authority=f"customer.{other_ns}".encode()))) == other, name


def test_corpus_first_mesh_virtual_service_serves_its_host():
    for namespace, name in (("default", "127.0.0.1_15001"), ("tutorial", "127.0.0.1_15002")):
        snap = corpus(namespace)
        route = route_for(snap, name, head(authority=b"recommendation.tutorial"))
        assert (route.virtual_service, _cluster(route)) == ("tutorial/recommendation", "outbound|8080|version-v2|recommendation")


def test_corpus_compiles_without_a_proxy_namespace():
    snap = corpus(None)
    assert snap.clusters["outbound|8080||recommendation"].lb_policy == "LEAST_REQUEST"


# ---- which namespace's rule applies


def _rule_docs():
    return (
        service("reviews", namespace="bookinfo"),
        _dr("reviews", "reviews", "bookinfo", trafficPolicy=_lb("LEAST_REQUEST"), subsets=[_subset("v1", "v1")]),
        _dr("reviews-client", "reviews.bookinfo.svc.cluster.local", "frontend", exportTo=["."],
            trafficPolicy=_lb("RANDOM"), subsets=[_subset("v1", "v1")]),
        _dr("mesh", "*.local", "istio-system", trafficPolicy=_lb("ROUND_ROBIN")),
    )


@pytest.mark.parametrize(("proxy_namespace", "policy"), [
    ("frontend", "RANDOM"),  # the rule in the client's own namespace first
    ("bookinfo", "LEAST_REQUEST"),  # then the service's namespace
    ("other", "LEAST_REQUEST"),  # frontend's rule is not for other namespaces (and exported only to itself)
    (None, "LEAST_REQUEST"),
])
def test_destination_rule_lookup_client_then_service_namespace(proxy_namespace, policy):
    snap = compile_docs(*_rule_docs(), proxy_namespace=proxy_namespace)
    assert snap.clusters["outbound|8080||reviews"].lb_policy == policy


def test_destination_rule_lookup_falls_back_to_the_root_namespace():
    docs = [d for d in _rule_docs() if (d["kind"], d["metadata"]["name"]) != ("DestinationRule", "reviews")]
    snap = compile_docs(*docs, proxy_namespace="other")
    assert snap.clusters["outbound|8080||reviews"].lb_policy == "ROUND_ROBIN"


def test_service_namespace_rule_not_exported_to_the_client_is_skipped():
    docs = (
        service("reviews", namespace="bookinfo"),
        _dr("reviews", "reviews", "bookinfo", exportTo=["."], trafficPolicy=_lb("LEAST_REQUEST")),
        _dr("mesh", "*.local", "istio-system", trafficPolicy=_lb("RANDOM")),
    )
    assert compile_docs(*docs, proxy_namespace="bookinfo").clusters["outbound|8080||reviews"].lb_policy == "LEAST_REQUEST"
    assert compile_docs(*docs, proxy_namespace="frontend").clusters["outbound|8080||reviews"].lb_policy == "RANDOM"


def test_rules_with_different_export_to_do_not_merge():
    docs = (
        service("reviews", namespace="bookinfo"),
        _dr("for-a", "reviews", "bookinfo", exportTo=["a"], subsets=[_subset("v1", "v1")]),
        _dr("for-b", "reviews", "bookinfo", exportTo=["b"], subsets=[_subset("v2", "v2")]),
    )
    for ns, subset in (("a", "v1"), ("b", "v2")):
        clusters = compile_docs(*docs, proxy_namespace=ns).clusters
        assert {c.subset for c in clusters.values()} == {"", subset}, ns


def test_duplicate_subset_inside_one_rule_is_still_an_error():
    bad = _dr("r", "reviews", subsets=[_subset("v1", "v1"), _subset("v1", "v2")])
    with pytest.raises(ConfigError) as e:
        compile_docs(service("reviews"), bad)
    assert e.value.field_path == "$.spec.subsets[1].name"


# ---- names per namespace


def test_destination_resolves_in_its_namespace_then_by_export_to():
    vs = doc("VirtualService", "front", {"hosts": ["front.example.com"], "gateways": ["gw"],
                                         "http": [{"route": [{"destination": {"host": "customer"}}]}]}, "web")
    gw = doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}, "web")
    hidden = service("customer", namespace="default", exportTo=["."])
    shown = service("customer", namespace="tutorial")
    snap = compile_docs(gw, vs, hidden, shown)
    assert _cluster(route_for(snap, "127.0.0.1_8080", head(authority=b"front.example.com"))) == TUTORIAL_CUSTOMER
    with pytest.raises(ConfigError) as e:
        compile_docs(gw, vs, hidden)
    assert e.value.field_path == "$.spec.http[0].route[0].destination.host"
    assert "not exported to namespace 'web'" in str(e.value)


def test_same_host_twice_in_one_namespace_is_still_refused():
    with pytest.raises(ConfigError) as e:
        compile_docs(service("customer", namespace="tutorial"), service("customer", namespace="tutorial", name="customer2"))
    assert "already declared by ServiceEntry tutorial/customer" in str(e.value)


def test_a_short_host_in_one_namespace_keeps_its_short_cluster_name():
    snap = compile_docs(service("customer", namespace="tutorial"))
    assert list(snap.clusters) == ["outbound|8080||customer"]
