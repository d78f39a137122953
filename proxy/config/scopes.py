"""Which of a kind's mesh-, namespace- and workload-scoped resources apply to one proxy, as Istio
scopes PeerAuthentication and Telemetry: a resource without `selector` in the root namespace is the
mesh's, one without `selector` in the proxy's namespace is the namespace's, one with a `selector`
matching the proxy's labels in its namespace is the workload's; the first of each in config order.
A proxy that did not say its labels (a standalone gateway) is matched by every selector, as
AuthorizationPolicy's `applies` does. PeerAuthentication drops its root-namespace policies with a
selector before asking (Istio ignores them; peer_authentication.resolve)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple


class Scoped(NamedTuple):
    """The resources that apply, least specific first; None where there is none. A proxy of the
    root namespace has no namespace layer apart from the mesh's."""

    mesh: Any
    namespace: Any
    workload: Any


def selects(match_labels: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    return labels is None or all(labels.get(k) == v for k, v in match_labels.items())


def scoped(resources: Iterable, root_namespace: str, proxy_namespace: str | None,
           proxy_labels: Mapping[str, str] | None) -> Scoped:
    """`resources`: loaded resources of one kind (anything with .namespace and .obj.spec.selector)."""
    mesh = namespace = workload = None
    for r in resources:
        selector = r.obj.spec.selector
        match_labels = selector.match_labels if selector is not None else {}
        if not match_labels:
            if r.namespace == root_namespace:
                if mesh is None:
                    mesh = r
            elif proxy_namespace is not None and r.namespace == proxy_namespace and namespace is None:
                namespace = r
        elif (workload is None and proxy_namespace is not None and r.namespace == proxy_namespace
              and selects(match_labels, proxy_labels)):
            workload = r
    return Scoped(mesh, namespace, workload)
