"""The mutual TLS mode PeerAuthentication gives this workload, per port. Pure.

Istio's precedence: the mesh policy (root namespace, no selector), overridden by the namespace's
policy (no selector), overridden by a workload policy (its namespace, a selector matching the
workload's labels); `UNSET` inherits from the level above, and a workload policy's `portLevelMtls`
overrides its own mode for one port. With no policy at all the mode is PERMISSIVE (Istio's
default). Where several policies share a level, the first in config order wins (Istio: the oldest).
A policy with a selector in the root namespace is ignored, as Istio documents (its
ComposePeerAuthentication skips it), even for a workload of the root namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from proxy.config.scopes import scoped

DEFAULT_MODE = "PERMISSIVE"


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """The effective mode of every inbound port: `port_modes` where a port differs from `mode`."""

    mode: str = DEFAULT_MODE
    port_modes: Mapping[int, str] = field(default_factory=dict)
    # the policies that decided, "ns/name" from the widest to the narrowest, for /config_dump
    sources: tuple[str, ...] = ()

    def mode_for(self, port: int) -> str:
        return self.port_modes.get(port, self.mode)

    @property
    def strict_anywhere(self) -> bool:
        return self.mode == "STRICT" or "STRICT" in self.port_modes.values()


def _has_selector(r) -> bool:
    selector = r.obj.spec.selector
    return selector is not None and bool(selector.match_labels)


def _honoured(policies: Iterable, root_namespace: str) -> Iterable:
    # dropped here, not in scopes.scoped: a Telemetry with a selector in the root namespace does apply
    # (to the root namespace's workloads)
    return (r for r in policies if not (r.namespace == root_namespace and _has_selector(r)))


def resolve(policies: Iterable, root_namespace: str, proxy_namespace: str | None,
            proxy_labels: Mapping[str, str] | None) -> MtlsPolicy:
    """`policies`: loaded PeerAuthentication resources (anything with .namespace, .name, .obj.spec)."""
    mesh, namespace, workload = scoped(_honoured(policies, root_namespace), root_namespace, proxy_namespace,
                                       proxy_labels)
    mode = DEFAULT_MODE
    sources: list[str] = []
    for r in (mesh, namespace, workload):
        if r is None:
            continue
        sources.append(f"{r.namespace}/{r.name}")
        mtls = r.obj.spec.mtls
        if mtls is not None and mtls.mode != "UNSET":
            mode = mtls.mode
    port_modes: dict[int, str] = {}
    if workload is not None and workload.obj.spec.port_level_mtls:
        for port, mtls in sorted(workload.obj.spec.port_level_mtls.items()):
            if mtls.mode != "UNSET" and mtls.mode != mode:
                port_modes[port] = mtls.mode
    return MtlsPolicy(mode, port_modes, tuple(sources))


def describe(policy: MtlsPolicy) -> dict:
    return {"mode": policy.mode, "port_modes": {str(p): m for p, m in policy.port_modes.items()},
            "sources": list(policy.sources)}
