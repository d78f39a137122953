"""The tracing and access-logging settings of Istio's Telemetry resources that apply to one proxy (pure).

Scopes as Istio: a Telemetry in the root namespace without `selector` applies to the mesh, one in
the proxy's namespace without `selector` to the namespace, one there with a `selector` matching the
proxy's labels to the workload. The most specific one that sets a field wins, field by field (a
workload Telemetry without `randomSamplingPercentage` keeps the namespace's or the mesh's). Several
at one scope: the first in resource order (Istio takes the oldest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from proxy.config.access_log_filter import compile_filter
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


@dataclass(frozen=True, slots=True)
class AccessLogChoice:
    """Access logging for one side of the proxy's traffic (Telemetry `match.mode`: CLIENT is what the
    proxy sends out, a gateway's traffic included; SERVER what a sidecar receives)."""

    enabled: bool = True
    filter_expression: str | None = None
    filter: Callable[[Any], bool] | None = None  # the compiled expression (access_log_filter.py)
    text: bool = False  # the `envoy` provider was named: Envoy's text format whatever --access-log says

    def logs(self, ctx: Any) -> bool:
        return self.enabled and (self.filter is None or self.filter(ctx))


DEFAULT_ACCESS_LOG = AccessLogChoice()


@dataclass(frozen=True, slots=True)
class AccessLoggingPolicy:
    client: AccessLogChoice = DEFAULT_ACCESS_LOG
    server: AccessLogChoice = DEFAULT_ACCESS_LOG
    sources: tuple[str, ...] = ()  # "namespace/name" of the Telemetry resources that decided, mesh first

    def for_direction(self, inbound: bool) -> AccessLogChoice:
        return self.server if inbound else self.client


_MODES = {"CLIENT": ("client",), "SERVER": ("server",), "CLIENT_AND_SERVER": ("client", "server")}


def resolve_access_logging(resources: Iterable, root_namespace: str, proxy_namespace: str | None,
                           proxy_labels: Mapping[str, str] | None) -> AccessLoggingPolicy | None:
    """None when no Telemetry that applies says anything of access logging (every request is logged
    in the proxy's --access-log format). Scopes as for tracing; within a scope each `accessLogging`
    entry sets the sides its `match.mode` names, field by field over the less specific scopes."""
    layers = [r for r in scoped(resources, root_namespace, proxy_namespace, proxy_labels)
              if r is not None and r.obj.spec.access_logging]
    if not layers:
        return None
    sides: dict[str, dict[str, Any]] = {"client": {}, "server": {}}
    for r in layers:
        for entry in r.obj.spec.access_logging:
            mode = entry.match.mode if entry.match is not None else "CLIENT_AND_SERVER"
            for side in _MODES[mode]:
                fields = sides[side]
                if entry.disabled is not None:
                    fields["enabled"] = not entry.disabled
                if entry.filter is not None:
                    fields["filter_expression"] = entry.filter.expression
                    fields["filter"] = compile_filter(entry.filter.expression)
                if entry.providers:
                    fields["text"] = True  # every provider we accept is `envoy`
    return AccessLoggingPolicy(AccessLogChoice(**sides["client"]), AccessLogChoice(**sides["server"]),
                               tuple(f"{r.namespace}/{r.name}" for r in layers))


def describe_access_logging(policy: AccessLoggingPolicy | None) -> dict | None:
    if policy is None:
        return None

    def side(choice: AccessLogChoice) -> dict:
        return {"enabled": choice.enabled, "filter": choice.filter_expression,
                "provider": "envoy" if choice.text else "default"}

    return {"client": side(policy.client), "server": side(policy.server), "sources": list(policy.sources)}


@dataclass(frozen=True, slots=True)
class MetricsRule:
    """One `metrics[].overrides[]` entry: for the series of `metrics` whose `reporter` is in
    `reporters`, maybe disable them, then drop the `remove` labels and set the `upsert` ones."""

    metrics: frozenset[str]  # Prometheus family names (istio_requests_total, ...)
    reporters: frozenset[str]  # "source" (CLIENT), "destination" (SERVER)
    disabled: bool | None = None
    remove: tuple[str, ...] = ()
    upsert: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsPolicy:
    rules: tuple[MetricsRule, ...]  # applied in order: mesh, namespace, workload; entries in order
    sources: tuple[str, ...] = ()


_REPORTERS = {"CLIENT": frozenset({"source"}), "SERVER": frozenset({"destination"}),
              "CLIENT_AND_SERVER": frozenset({"source", "destination"})}


def resolve_metrics(resources: Iterable, root_namespace: str, proxy_namespace: str | None,
                    proxy_labels: Mapping[str, str] | None) -> MetricsPolicy | None:
    """None when no Telemetry that applies overrides a metric (Istio's metrics are served as
    recorded). The overrides of every scope apply, the more specific ones after (so they win)."""
    from proxy.config.istio import ISTIO_METRIC_NAMES, literal_tag_value

    layers = [r for r in scoped(resources, root_namespace, proxy_namespace, proxy_labels)
              if r is not None and r.obj.spec.metrics]
    rules: list[MetricsRule] = []
    for r in layers:
        for metrics in r.obj.spec.metrics:
            for override in metrics.overrides:
                match = override.match
                metric = match.metric if match is not None else "ALL_METRICS"
                names = frozenset(ISTIO_METRIC_NAMES.values()) if metric == "ALL_METRICS" else frozenset(
                    {ISTIO_METRIC_NAMES[metric]})
                mode = match.mode if match is not None else "CLIENT_AND_SERVER"
                remove = tuple(k for k, t in override.tag_overrides.items() if t.operation == "REMOVE")
                upsert = tuple((k, literal_tag_value(t.value)) for k, t in override.tag_overrides.items()
                               if t.operation == "UPSERT")
                rules.append(MetricsRule(names, _REPORTERS[mode], override.disabled, remove, upsert))
    if not rules:
        return None
    return MetricsPolicy(tuple(rules), tuple(f"{r.namespace}/{r.name}" for r in layers))


def describe_metrics(policy: MetricsPolicy | None) -> dict | None:
    if policy is None:
        return None
    return {"overrides": [{"metrics": sorted(rule.metrics), "reporters": sorted(rule.reporters),
                           "disabled": rule.disabled, "remove": list(rule.remove), "upsert": dict(rule.upsert)}
                          for rule in policy.rules],
            "sources": list(policy.sources)}
