"""A request's trace (sans-IO): the sampling decision, the ids of its server and client spans, and
their Zipkin v2 JSON form with the tags Envoy's Zipkin tracer sets."""

from __future__ import annotations

import time
from dataclasses import dataclass
from random import random
from typing import TYPE_CHECKING, Any

from proxy.tracing.propagation import IncomingTrace, new_span_id, new_trace_id

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext

DEFAULT_SAMPLING_PERCENT = 1.0  # Istio's meshConfig.defaultConfig.tracing.sampling default


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """What one proxy traces with: where spans go, how many requests are sampled, how it names itself."""

    collector: tuple[str, int]  # the Zipkin collector's host and port (POST /api/v2/spans)
    sampling_percent: float = DEFAULT_SAMPLING_PERCENT
    service_name: str = "triomesh"  # Zipkin localEndpoint.serviceName: "workload.namespace" as Istio
    node_id: str = ""
    max_queued_spans: int = 4096  # per worker; spans beyond it are dropped and counted
    flush_interval_s: float = 1.0


def decide_sampling(incoming: IncomingTrace, sampling_percent: float, draw=random) -> bool:
    """Envoy's order: x-client-trace-id forces sampling; else an incoming decision is honoured; else
    a random draw against the configured percentage."""
    if incoming.forced:
        return True
    if incoming.sampled is not None:
        return incoming.sampled
    return sampling_percent > 0 and draw() * 100.0 < sampling_percent


class RequestTrace:
    """The spans of one sampled request, kept in the request's scratch state until it finishes. The
    server span is a child of the incoming span (Envoy with `shared_span_context: false`, as Istio
    sets it); the client span, whose id goes upstream, is a child of the server span."""

    __slots__ = ("trace_id", "parent_id", "server_span_id", "client_span_id", "start_wall_us", "client_start_wall_us",
                 "client_end_wall_us")

    def __init__(self, incoming: IncomingTrace, start_wall_us: int, client_start_wall_us: int) -> None:
        self.trace_id = incoming.trace_id or new_trace_id()
        self.parent_id = incoming.span_id
        self.server_span_id = new_span_id()
        self.client_span_id = new_span_id()
        self.start_wall_us = start_wall_us
        self.client_start_wall_us = client_start_wall_us
        # when the upstream response's last byte arrived or the upstream failed (0: the request's
        # end, for a request that never got that far)
        self.client_end_wall_us = 0

    def zipkin_spans(self, ctx: RequestContext, settings: TracingSettings, end_wall_us: int) -> list[dict[str, Any]]:
        """The server span and, when the request reached an upstream, the client span (Zipkin v2)."""
        head = ctx.request
        status = ctx.status
        flags = ",".join(ctx.response_flags) if ctx.response_flags else "-"
        authority = head.authority.decode("latin-1")
        target = head.target.decode("latin-1")
        # origin-form targets get scheme and authority; an absolute-form one is already a URL
        url = f"{head.scheme.decode()}://{authority}{target}" if target.startswith("/") else target
        method = head.method.decode("latin-1")
        tags = {
            "component": "proxy",
            "node_id": settings.node_id,
            "guid:x-request-id": ctx.request_id.decode("latin-1"),
            "http.method": method,
            "http.url": url,
            "http.protocol": "HTTP/" + head.http_version.decode(),
            "downstream_cluster": "-",
            "user_agent": next((v.decode("latin-1") for n, v in head.headers if n == b"user-agent"), "-"),
            "peer.address": ctx.downstream_addr.rpartition(":")[0].strip("[]"),
            "http.status_code": str(status),
            "response_size": str(ctx.bytes_sent),
            "request_size": str(ctx.bytes_received),
            "response_flags": flags,
            "upstream_cluster": ctx.cluster.name if ctx.cluster is not None else "-",
            "upstream_cluster.name": ctx.cluster.name if ctx.cluster is not None else "-",
        }
        if status >= 500 or status == 0:
            tags["error"] = "true"
        local = {"serviceName": settings.service_name}
        # Istio's default operation name (the route decorator): "{authority}/*"
        operation = f"{authority}/*"
        server = {"traceId": self.trace_id.decode(), "id": self.server_span_id.decode(), "kind": "SERVER",
                  "name": operation, "timestamp": self.start_wall_us,
                  "duration": max(1, end_wall_us - self.start_wall_us), "localEndpoint": local, "tags": tags}
        if self.parent_id is not None:
            server["parentId"] = self.parent_id.decode()
        spans = [server]
        if ctx.upstream_host:
            client_tags = dict(tags)
            client_tags["upstream_address"] = ctx.upstream_host
            ip, _, port = ctx.upstream_host.rpartition(":")
            client = {"traceId": self.trace_id.decode(), "id": self.client_span_id.decode(),
                      "parentId": self.server_span_id.decode(), "kind": "CLIENT", "name": operation,
                      "timestamp": self.client_start_wall_us,
                      "duration": max(1, (self.client_end_wall_us or end_wall_us) - self.client_start_wall_us),
                      "localEndpoint": local,
                      "remoteEndpoint": _endpoint(ip, port), "tags": client_tags}
            spans.append(client)
        return spans


def upstream_response_ended(extra: dict) -> None:
    """The upstream response ended (its last byte arrived, or the upstream failed): a sampled
    request's client span ends now, not when the response has also reached the downstream. The
    router calls it only for requests with scratch state (`ctx.extra`), so others pay one check."""
    trace = extra.get("trace")
    if trace is not None:
        trace.client_end_wall_us = int(time.time() * 1_000_000)


def _endpoint(ip: str, port: str) -> dict[str, Any]:
    ip = ip.strip("[]")
    endpoint: dict[str, Any] = {"ipv6" if ":" in ip else "ipv4": ip}
    if port.isdigit():
        endpoint["port"] = int(port)
    return endpoint
