"""The tracing settings of Istio's Telemetry resources that apply to one proxy (pure).

Scopes as Istio: a Telemetry in the root namespace without `selector` applies to the mesh, one in
the proxy's namespace without `selector` to the namespace, one there with a `selector` matching the
proxy's labels to the workload. The most specific one that sets a field wins, field by field (a
workload Telemetry without `randomSamplingPercentage` keeps the namespace's or the mesh's). Several
at one scope: the first in resource order (Istio takes the oldest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from proxy.config.scopes import scoped


@dataclass(frozen=True, slots=True)
class TracingPolicy:
    sampling_percent: float | None = None  # None: the proxy's --trace-sampling
    disable_span_reporting: bool = False  # decisions and headers still go on; no span is reported
    sources: tuple[str, ...] = ()  # "namespace/name" of the Telemetry resources that decided, mesh first


def resolve(resources: Iterable, root_namespace: str, proxy_namespace: str | None,
            proxy_labels: Mapping[str, str] | None) -> TracingPolicy:
    """`resources`: loaded Telemetry resources (anything with .namespace, .name, .obj.spec)."""
    mesh, namespace, workload = scoped(resources, root_namespace, proxy_namespace, proxy_labels)
    sampling_percent: float | None = None
    disabled = False
    sources: list[str] = []
    for r in (mesh, namespace, workload):
        if r is None or not r.obj.spec.tracing:
            continue
        sources.append(f"{r.namespace}/{r.name}")
        tracing = r.obj.spec.tracing[0]
        if tracing.random_sampling_percentage is not None:
            sampling_percent = tracing.random_sampling_percentage
        if tracing.disable_span_reporting is not None:
            disabled = tracing.disable_span_reporting
    return TracingPolicy(sampling_percent, disabled, tuple(sources))


def describe(policy: TracingPolicy) -> dict:
    return {"random_sampling_percentage": policy.sampling_percent,
            "disable_span_reporting": policy.disable_span_reporting, "sources": list(policy.sources)}
