"""Kinds triomesh does not load, and what to tell a user who wrote one: removed from Istio (when, and
what replaced it) or current Istio that triomesh does not support yet.

Removed kinds are matched by API group and kind, since their names are generic (`rule`, `Policy`):
a kyverno.io `Policy` is not Istio's. Kinds not supported yet are matched by kind alone (a wrong
group there is the smaller problem), except the Gateway API's, whose `Gateway` shares its name with
Istio's.
"""

from __future__ import annotations

_MIXER = ("Mixer configuration, removed in Istio 1.8 (deprecated in 1.5): telemetry is configured with "
          "Telemetry resources, access control with AuthorizationPolicy, extensions with WasmPlugin or EnvoyFilter")
_V1ALPHA1_ROUTING = "the first traffic API, replaced in Istio 0.8 and removed in Istio 1.0: use {}"
_V1ALPHA1_AUTHN = "removed in Istio 1.6 (deprecated in 1.4): use {}"

# (API group, kind) -> what became of it
REMOVED: dict[tuple[str, str], str] = {
    ("config.istio.io", "RouteRule"): _V1ALPHA1_ROUTING.format("VirtualService (networking.istio.io)"),
    ("config.istio.io", "DestinationPolicy"): _V1ALPHA1_ROUTING.format("DestinationRule (networking.istio.io)"),
    ("config.istio.io", "EgressRule"): _V1ALPHA1_ROUTING.format("ServiceEntry (networking.istio.io)"),
    ("authentication.istio.io", "Policy"): _V1ALPHA1_AUTHN.format(
        "PeerAuthentication for mutual TLS and RequestAuthentication for JWT (security.istio.io)"),
    ("authentication.istio.io", "MeshPolicy"): _V1ALPHA1_AUTHN.format(
        "a PeerAuthentication in the root namespace (security.istio.io)"),
    **{("rbac.istio.io", kind): _V1ALPHA1_AUTHN.format("AuthorizationPolicy (security.istio.io)")
       for kind in ("ServiceRole", "ServiceRoleBinding", "ClusterRbacConfig", "RbacConfig")},
}
# every other config.istio.io kind (handler, rule, instance, attributemanifest, adapter, template and
# the adapter-specific kinds of Istio before 1.2) was Mixer's
REMOVED_GROUPS: dict[str, str] = {"config.istio.io": _MIXER}

NOT_YET: frozenset[str] = frozenset({
    "RequestAuthentication",  # security.istio.io
    "EnvoyFilter", "WorkloadGroup", "ProxyConfig",  # networking.istio.io
    "WasmPlugin",  # extensions.istio.io
})
GATEWAY_API_GROUP = "gateway.networking.k8s.io"


def _group(api_version: object) -> str:
    return api_version.rpartition("/")[0] if isinstance(api_version, str) else ""


def explain(kind: str, api_version: object) -> str | None:
    """Why a kind triomesh does not load is refused, for the kinds Istio users meet; None otherwise."""
    group = _group(api_version)
    given = f"{kind} ({api_version})" if isinstance(api_version, str) else f"{kind} (no apiVersion)"
    removed = REMOVED.get((group, kind)) or REMOVED_GROUPS.get(group)
    if removed is not None:
        return f"{given} was removed from Istio: {removed}"
    if group == GATEWAY_API_GROUP:
        return f"{given} is a Kubernetes Gateway API kind; triomesh does not support the Gateway API yet"
    if kind in NOT_YET:
        return f"{given} is an Istio kind triomesh does not support yet"
    return None
