"""Per-proxy views: Sidecar selection and narrowing, reference closure, content versions, deltas."""

from __future__ import annotations

from controlplane.snapshots import (ProxyClass, StoredResource, ViewCache, compute_view, delta, representative_classes,
                                    select_sidecar)
from controlplane.store import ConfigStore
from controlplane.wire import ResourceKey
from proxy.config.compile import compile_resources

from cp_fixtures import RULES, SERVICES, SIDECAR_NARROW, split


def _store(*texts: str) -> ConfigStore:
    store = ConfigStore(None)
    store.apply([(f"doc{i}.yaml", t.encode()) for i, t in enumerate(texts)])
    return store


def _names(view) -> list[str]:
    return [str(s.key) for s in view.resources]


def test_without_a_sidecar_a_proxy_sees_everything():
    store = _store(SERVICES, RULES, split(80, 20))
    view = compute_view(store.state, ProxyClass.of("tutorial", {"app": "customer"}))
    assert len(view.resources) == len(store.state) == 7


def test_sidecar_egress_hosts_narrow_services_and_keep_references_resolvable():
    store = _store(SERVICES, RULES, split(80, 20), SIDECAR_NARROW)
    pc = ProxyClass.of("tutorial", {"app": "customer"})
    view = compute_view(store.state, pc)
    # only ./preference is visible: recommendation's VS, SE, DR and WorkloadEntries and finance/billing are not
    assert _names(view) == ["ServiceEntry tutorial/preference", "Sidecar tutorial/default"]
    compile_resources([s.resource for s in view.resources], version="x", proxy_labels=pc.label_dict)
    # another namespace has no Sidecar: it sees everything except tutorial's Sidecar
    other = compute_view(store.state, ProxyClass("finance"))
    assert "Sidecar tutorial/default" not in _names(other) and len(other.resources) == 7


def test_an_included_route_pulls_in_its_destination_service():
    narrow = SIDECAR_NARROW.replace('["./preference"]', '["./recommendation"]')
    store = _store(SERVICES, RULES, split(80, 20), narrow)
    view = compute_view(store.state, ProxyClass("tutorial"))
    assert _names(view) == [
        "DestinationRule tutorial/recommendation",
        "ServiceEntry tutorial/recommendation",
        "Sidecar tutorial/default",
        "VirtualService tutorial/recommendation",
        "WorkloadEntry tutorial/recommendation-v1",
        "WorkloadEntry tutorial/recommendation-v2",
    ]
    compile_resources([s.resource for s in view.resources], version="x", proxy_labels={})


def test_sidecar_selection_order():
    def sc(name, ns, selector=""):
        sel = f"workloadSelector: {{labels: {{{selector}}}}}" if selector else ""
        return f"""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}, namespace: {ns}}}
spec:
  {sel}
  egress: [{{hosts: ["./*"]}}]
"""
    store = _store(sc("ns-default", "tutorial"), sc("for-v2", "tutorial", "version: v2"), sc("root", "istio-system"))
    pick = lambda ns, labels: select_sidecar(store.state, ProxyClass.of(ns, labels)).key.name  # noqa: E731
    assert pick("tutorial", {"version": "v2"}) == "for-v2"
    assert pick("tutorial", {"version": "v1"}) == "ns-default"
    assert pick("elsewhere", {}) == "root"


def test_versions_change_only_for_proxies_that_see_the_change():
    store = _store(SERVICES, RULES, split(80, 20), SIDECAR_NARROW)
    narrowed, full = ProxyClass("tutorial"), ProxyClass("finance")
    before = ViewCache(store.state)
    store.apply([("w.yaml", split(50, 50).encode())])
    after = ViewCache(store.state)
    assert before.view(narrowed).version == after.view(narrowed).version  # it does not see recommendation
    assert before.view(full).version != after.view(full).version
    # the version is a content hash: the same content gives the same version
    store.apply([("w.yaml", split(80, 20).encode())])
    assert ViewCache(store.state).view(full).version == before.view(full).version


def test_delta_between_sets():
    store = _store(SERVICES, RULES, split(80, 20))
    pc = ProxyClass("tutorial")
    old = compute_view(store.state, pc).by_key()
    store.apply([("w.yaml", split(50, 50).encode())])
    new = compute_view(store.state, pc)
    changed, removed = delta(old, new)
    assert [str(s.key) for s in changed] == ["VirtualService tutorial/recommendation"] and removed == []
    smaller = type(new)(tuple(s for s in new.resources if s.key.kind != "WorkloadEntry"), "v")
    changed, removed = delta(old, smaller)
    assert sorted(k.name for k in removed) == ["recommendation-v1", "recommendation-v2"]


def test_stored_resource_wire_form_is_stable():
    store = _store(SERVICES)
    s = store.state[ResourceKey("ServiceEntry", "tutorial", "preference")]
    again = StoredResource.of(s.resource)
    assert again.body == s.body and again.digest == s.digest
    assert bytes(s.wire.body) == s.body and s.wire.file == "doc0.yaml" and s.wire.document == 1


def test_labels_no_selector_reads_do_not_split_classes():
    sidecar = SIDECAR_NARROW.replace("spec:\n", "spec:\n  workloadSelector: {labels: {app: customer}}\n", 1)
    store = _store(SERVICES, RULES, split(80, 20), sidecar)
    cache = ViewCache(store.state)
    a = cache.view(ProxyClass.of("tutorial", {"app": "customer", "pod": "customer-1"}))
    b = cache.view(ProxyClass.of("tutorial", {"app": "customer", "pod": "customer-2"}))
    c = cache.view(ProxyClass.of("tutorial", {"app": "other", "pod": "customer-1"}))
    assert a is b  # computed once
    assert "Sidecar tutorial/default" in _names(a) and "Sidecar tutorial/default" not in _names(c)
    assert cache.keys == {"app"}


SECURITY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: preference-only, namespace: tutorial}
spec:
  selector: {matchLabels: {app: preference}}
  rules: [{from: [{source: {principals: [cluster.local/ns/tutorial/sa/recommendation]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: finance-all, namespace: finance}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: workload, namespace: istio-system}
spec: {selector: {matchLabels: {app: preference}}, mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: preference, namespace: tutorial}
spec:
  selector: {matchLabels: {app: preference}}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
"""


def test_a_proxy_gets_the_security_policies_that_apply_to_it():
    store = _store(SERVICES, SECURITY)
    security = lambda view: [n for n in _names(view) if n.startswith(("AuthorizationPolicy", "PeerAuthentication"))]
    preference = compute_view(store.state, ProxyClass.of("tutorial", {"app": "preference"}))
    assert security(preference) == ["AuthorizationPolicy istio-system/mesh-deny",
                                    "AuthorizationPolicy tutorial/preference-only",
                                    "PeerAuthentication istio-system/default", "PeerAuthentication tutorial/preference"]
    customer = compute_view(store.state, ProxyClass.of("tutorial", {"app": "customer"}))
    assert security(customer) == ["AuthorizationPolicy istio-system/mesh-deny", "PeerAuthentication istio-system/default"]
    snapshot = compile_resources([s.resource for s in preference.resources], version="x",
                                 proxy_labels={"app": "preference"}, proxy_namespace="tutorial")
    assert [p.name for p in snapshot.authorization.allow] == ["preference-only"]
    assert snapshot.mtls.mode == "STRICT" and dict(snapshot.mtls.port_modes) == {8080: "PERMISSIVE"}
    # the selector's labels split proxy classes (a label nothing else selects on would not)
    assert "app" in ViewCache(store.state).keys


TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec: {tracing: [{randomSamplingPercentage: 10.0}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: workload, namespace: istio-system}
spec: {selector: {matchLabels: {app: preference}}, tracing: [{randomSamplingPercentage: 0.0}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: preference, namespace: tutorial}
spec: {selector: {matchLabels: {app: preference}}, tracing: [{randomSamplingPercentage: 100.0}]}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: finance, namespace: finance}
spec: {tracing: [{disableSpanReporting: true}]}
"""


def test_a_proxy_gets_the_telemetry_resources_that_apply_to_it():
    store = _store(SERVICES, TELEMETRY)
    telemetry = lambda view: [n for n in _names(view) if n.startswith("Telemetry")]
    preference = compute_view(store.state, ProxyClass.of("tutorial", {"app": "preference"}))
    # a selector in the root namespace selects nothing (Istio: the root namespace's is mesh-wide only)
    assert telemetry(preference) == ["Telemetry istio-system/mesh-default", "Telemetry tutorial/preference"]
    customer = compute_view(store.state, ProxyClass.of("tutorial", {"app": "customer"}))
    assert telemetry(customer) == ["Telemetry istio-system/mesh-default"]
    snapshot = compile_resources([s.resource for s in preference.resources], version="x",
                                 proxy_labels={"app": "preference"}, proxy_namespace="tutorial")
    assert snapshot.tracing.sampling_percent == 100.0
    assert ProxyClass.of("tutorial", {"app": "preference"}) in representative_classes(store.state)
