"""PeerAuthentication's effective mode per workload and port: mesh, namespace, workload, portLevelMtls."""

from __future__ import annotations

import textwrap

from proxy.authz.peer_authentication import resolve
from proxy.config.load import load_bytes


def pa(name: str, namespace: str, body: str) -> str:
    return (f"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, "
            f"namespace: {namespace}}}\nspec:\n" + textwrap.indent(textwrap.dedent(body), "  ") + "\n---\n")


def modes(text: str, namespace: str | None = "foo", labels: dict | None = None):
    resources = [r for r in load_bytes(text) if r.kind == "PeerAuthentication"]
    return resolve(resources, "istio-system", namespace, labels if labels is not None else {"app": "httpbin"})


MESH_STRICT = pa("default", "istio-system", "mtls: {mode: STRICT}")


def test_default_is_permissive():
    policy = modes("")
    assert policy.mode == "PERMISSIVE" and policy.mode_for(8080) == "PERMISSIVE" and policy.sources == ()


def test_mesh_then_namespace_then_workload():
    assert modes(MESH_STRICT).mode == "STRICT"
    text = MESH_STRICT + pa("ns", "foo", "mtls: {mode: PERMISSIVE}")
    assert modes(text).mode == "PERMISSIVE"
    assert modes(text, namespace="bar").mode == "STRICT"
    text += pa("wl", "foo", "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: DISABLE}")
    policy = modes(text)
    assert policy.mode == "DISABLE" and policy.sources == ("istio-system/default", "foo/ns", "foo/wl")
    assert modes(text, labels={"app": "other"}).mode == "PERMISSIVE"


def test_unset_inherits_from_the_parent():
    text = MESH_STRICT + pa("ns", "foo", "mtls: {mode: UNSET}") + pa(
        "wl", "foo", "selector: {matchLabels: {app: httpbin}}\nmtls: {}")
    assert modes(text).mode == "STRICT"
    assert modes(pa("ns", "foo", "{}")).mode == "PERMISSIVE"


def test_port_level_mtls_overrides_the_workload_mode():
    text = MESH_STRICT + pa("wl", "foo", """
        selector: {matchLabels: {app: httpbin}}
        portLevelMtls:
          8080: {mode: DISABLE}
          9090: {mode: UNSET}
          9191: {mode: STRICT}
        """)
    policy = modes(text)
    assert policy.mode == "STRICT"
    assert (policy.mode_for(8080), policy.mode_for(9090), policy.mode_for(9191), policy.mode_for(1)) == (
        "DISABLE", "STRICT", "STRICT", "STRICT")
    assert dict(policy.port_modes) == {8080: "DISABLE"}


def test_a_selector_applies_only_in_its_own_namespace_and_the_first_policy_per_level_wins():
    text = pa("first", "foo", "mtls: {mode: DISABLE}") + pa("second", "foo", "mtls: {mode: STRICT}")
    assert modes(text).mode == "DISABLE" and modes(text).sources == ("foo/first",)
    text += (pa("wl1", "foo", "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: STRICT}")
             + pa("wl2", "foo", "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: PERMISSIVE}"))
    assert modes(text).mode == "STRICT"
    assert modes(text, namespace="bar").mode == "PERMISSIVE"


def test_a_selector_in_the_root_namespace_is_ignored():
    # Istio: "PeerAuthentication policies with workload selectors are ignored when deployed in the root
    # namespace", for a workload of any namespace, the root namespace's own included
    root_workload = pa("wl", "istio-system", """
        selector: {matchLabels: {app: httpbin}}
        mtls: {mode: STRICT}
        portLevelMtls: {8080: {mode: DISABLE}}
        """)
    for namespace in ("foo", "istio-system", None):
        policy = modes(root_workload, namespace=namespace)
        assert (policy.mode, dict(policy.port_modes), policy.sources) == ("PERMISSIVE", {}, ())
    policy = modes(pa("mesh", "istio-system", "mtls: {mode: DISABLE}") + root_workload, namespace="istio-system")
    assert (policy.mode, policy.sources) == ("DISABLE", ("istio-system/mesh",))


def test_a_proxy_without_namespace_gets_the_mesh_policy():
    assert modes(MESH_STRICT + pa("ns", "foo", "mtls: {mode: DISABLE}"), namespace=None).mode == "STRICT"
