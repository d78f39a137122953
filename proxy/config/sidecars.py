"""Which Sidecar resource applies to a workload, as Istio picks it: one, never a mix.

Istio: in the workload's own namespace, the first Sidecar (by name here; Istio uses creation time)
whose workloadSelector selects the workload; else the namespace's Sidecar without a selector; else
the root namespace's Sidecar without a selector (a mesh-wide default). The control plane uses this to
scope what it pushes, and the compiler for a proxy that knows its namespace, so files and a control
plane give a proxy the same Sidecar.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from proxy.config.load import Resource
from proxy.config.registry import ROOT_NAMESPACE


def select_sidecar(sidecars: Iterable[Resource], namespace: str,
                   selects: Callable[[Mapping[str, str]], bool]) -> Resource | None:
    """`selects(labels)`: whether a workloadSelector's labels select the workload."""
    by_name = sorted(sidecars, key=lambda r: (r.namespace, r.name))
    own = [r for r in by_name if r.namespace == namespace]
    for r in own:
        ws = r.obj.spec.workload_selector
        if ws is not None and ws.labels and selects(ws.labels):
            return r
    for r in own:
        ws = r.obj.spec.workload_selector
        if ws is None or not ws.labels:
            return r
    for r in by_name:
        ws = r.obj.spec.workload_selector
        if r.namespace == ROOT_NAMESPACE and (ws is None or not ws.labels):
            return r
    return None
