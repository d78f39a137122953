"""Istio's standard metrics (istio_requests_total, the duration and size histograms, the TCP
counters) with Istio's label set, filled as Istio's stats filter fills them.

Theory of operation. A label set of the HTTP metrics is a `Series`: a slot of the worker's
RequestTable (request_table.py, native when built), whose preallocated arrays hold its counts; Stats
reads them through views when /stats/prometheus is served. A request ends in pipeline.finish, which
calls `record_known(ctx)`, the table's own method: one native call reads the request's key (listener,
cluster, endpoint, peer facts, status: objects of its snapshot), finds the slot remembered for it,
reads the clock and counts the request. Only a request the table does not know takes the general
path, `record_request`: the facts that decide its labels form one tuple, and a dict maps that tuple
to the Series (no string is built per request); the first request with a new tuple derives the
label values (`_series_for`). Its key is then remembered, so the next such request is counted
natively. Requests with response flags or gRPC facts always take the general path (still one table
call for the counts). The remembered keys and the facts dict are emptied when the
snapshot changes (their meaning may change with it); the series themselves, which hold the counts,
stay.

Cardinality is bounded as Istio bounds it: anything not known is `unknown`, peer metadata values
are restricted to name characters (peer.py), and the number of label sets per worker is capped
(MAX_SERIES); requests beyond the cap are counted in triomesh_istio_series_overflow_total and not
reported in Istio's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from proxy.l7.context import RequestContext
from proxy.stats import HELP, Stats
from proxy.telemetry.buckets import DEFAULT_BUCKETS
from proxy.telemetry.peer import UNKNOWN, UNKNOWN_WORKLOAD, WorkloadIdentity, canonical_revision, canonical_service
from proxy.telemetry.peer_exchange import encode_frame
from proxy.telemetry.request_table import DURATION, REQUEST_BYTES, RESPONSE_BYTES, RequestTable

if TYPE_CHECKING:
    from proxy.config.snapshot import Cluster, Endpoint, Snapshot

MAX_SERIES = 2000  # label sets per worker for the HTTP metrics, and as many again for TCP
MAX_UPSTREAM_PRINCIPALS = 10000  # endpoints remembered for destination_principal

HELP.update({
    "istio_requests_total": "Requests handled, by Istio's standard labels.",
    "istio_request_duration_milliseconds": "Request duration, from the request head to the end of the response.",
    "istio_request_bytes": "Request body sizes.",
    "istio_response_bytes": "Response body sizes.",
    "istio_request_messages_total": "gRPC messages sent by clients.",
    "istio_response_messages_total": "gRPC messages sent by servers.",
    "istio_tcp_connections_opened_total": "TCP connections opened.",
    "istio_tcp_connections_closed_total": "TCP connections closed.",
    "istio_tcp_sent_bytes_total": "Bytes sent to the downstream of proxied TCP connections, counted when they close.",
    "istio_tcp_received_bytes_total": "Bytes received from the downstream of proxied TCP connections, counted when they close.",
    "triomesh_istio_series_overflow_total": "Requests or connections not reported in Istio's metrics because the label-set cap was reached.",
})


@dataclass(frozen=True, slots=True)
class ServiceLabels:
    """destination_service, destination_service_name, destination_service_namespace."""

    service: str = UNKNOWN
    name: str = UNKNOWN
    namespace: str = UNKNOWN


UNKNOWN_SERVICE = ServiceLabels()


def service_labels(cluster: Cluster | None) -> ServiceLabels:
    """The service of an outbound cluster: its FQDN for a short host (as Istio reports
    reviews.default.svc.cluster.local), the host itself for others."""
    if cluster is None or not cluster.service_host:
        return UNKNOWN_SERVICE
    host = cluster.service_host
    namespace = cluster.service_namespace or UNKNOWN
    if "." not in host and namespace != UNKNOWN:
        return ServiceLabels(f"{host}.{namespace}.svc.cluster.local", host, namespace)
    name = host.split(".", 1)[0] if host.endswith(".svc.cluster.local") else host
    return ServiceLabels(host, name, namespace)


def endpoint_identity(endpoint: Endpoint | None, cluster: Cluster | None) -> WorkloadIdentity:
    """What the registry tells of a destination endpoint when its sidecar said nothing (it has none,
    or is outside the mesh): its labels give app, version and canonical names; the workload name and
    cluster are not known."""
    if endpoint is None or not endpoint.labels:
        return UNKNOWN_WORKLOAD
    labels = endpoint.labels
    namespace = (cluster.service_namespace if cluster is not None else "") or UNKNOWN
    return WorkloadIdentity(namespace=namespace, app=labels.get("app", UNKNOWN),
                            version=labels.get("version", UNKNOWN),
                            canonical_service=canonical_service(labels, UNKNOWN),
                            canonical_revision=canonical_revision(labels) if labels else UNKNOWN)


def _workload_labels(prefix: str, identity: WorkloadIdentity) -> tuple[tuple[str, str], ...]:
    return ((f"{prefix}_workload", identity.workload), (f"{prefix}_workload_namespace", identity.namespace),
            (f"{prefix}_principal", identity.principal), (f"{prefix}_app", identity.app),
            (f"{prefix}_version", identity.version), (f"{prefix}_canonical_service", identity.canonical_service),
            (f"{prefix}_canonical_revision", identity.canonical_revision), (f"{prefix}_cluster", identity.cluster))


def connection_labels(reporter: str, source: WorkloadIdentity, destination: WorkloadIdentity,
                      service: ServiceLabels, request_protocol: str,
                      security_policy: str) -> tuple[tuple[str, str], ...]:
    """Istio's labels for a request or connection, in one fixed order, without the response's."""
    return (("reporter", reporter), *_workload_labels("source", source), *_workload_labels("destination", destination),
            ("destination_service", service.service), ("destination_service_name", service.name),
            ("destination_service_namespace", service.namespace), ("request_protocol", request_protocol),
            ("connection_security_policy", security_policy))


class Series:
    """One label set of the HTTP metrics: a slot of the worker's RequestTable, seen by Stats through
    views (the message counters: gRPC only)."""

    __slots__ = ("slot", "grpc")

    def __init__(self, stats: Stats, labels: tuple[tuple[str, str], ...], table: RequestTable, slot: int,
                 grpc: bool = False) -> None:
        self.slot = slot
        self.grpc = grpc
        duration = stats.histogram_view("istio_request_duration_milliseconds", labels, DEFAULT_BUCKETS,
                                        partial(table.histogram, slot, DURATION))
        stats.histogram_view("istio_request_bytes", labels, DEFAULT_BUCKETS, partial(table.histogram, slot, REQUEST_BYTES))
        stats.histogram_view("istio_response_bytes", labels, DEFAULT_BUCKETS,
                             partial(table.histogram, slot, RESPONSE_BYTES))
        # one request, one duration: the request count is the duration histogram's, not kept twice
        stats.counter_of_histogram("istio_requests_total", labels, duration)
        if grpc:
            messages = partial(table.messages, slot)
            stats.counter_view("istio_request_messages_total", labels, lambda: messages()[0])
            stats.counter_view("istio_response_messages_total", labels, lambda: messages()[1])


class TcpSeries:
    __slots__ = ("opened", "closed", "sent_bytes", "received_bytes")

    def __init__(self, stats: Stats, labels: tuple[tuple[str, str], ...]) -> None:
        self.opened = stats.counter_with_labels("istio_tcp_connections_opened_total", labels)
        self.closed = stats.counter_with_labels("istio_tcp_connections_closed_total", labels)
        self.sent_bytes = stats.counter_with_labels("istio_tcp_sent_bytes_total", labels)
        self.received_bytes = stats.counter_with_labels("istio_tcp_received_bytes_total", labels)


class IstioMetrics:
    """One worker's Istio metrics. `identity`: the workload this proxy serves (a gateway: itself)."""

    def __init__(self, stats: Stats, identity: WorkloadIdentity = UNKNOWN_WORKLOAD, clock=None,
                 max_series: int = MAX_SERIES) -> None:
        self.stats = stats
        self.identity = identity
        self.peer_frame = encode_frame(identity.header_value())  # what the TCP peer exchange sends
        # the SPIFFE ID each upstream endpoint (address, port) proved in its last mesh mTLS handshake:
        # written per connection (upstream_conn.open_connection), read for destination_principal
        self.upstream_principals: dict[tuple[str, int], str] = {}
        # this workload with the SPIFFE ID of its certificate: the principal of our side of a mesh
        # mTLS connection (destination_principal inbound, source_principal outbound), as Istio reports
        self.identity_over_mtls = identity
        self.clock = clock  # None: the Trio run's clock (what RequestContext.start_monotonic is read from)
        self.max_series = max_series
        self.table = RequestTable(max_series, 4 * max_series, RequestContext)
        # pipeline.finish's one call per request (False: not known, take record_request)
        self.record_known = self.table.record_known
        self._clock_bound = False
        self._snapshot: Snapshot | None = None
        self._by_facts: dict[tuple, Series | None] = {}
        self._by_labels: dict[tuple, Series] = {}
        self._tcp_by_facts: dict[tuple, TcpSeries | None] = {}
        self._tcp_by_labels: dict[tuple, TcpSeries] = {}
        self._overflow = stats.counter("triomesh_istio_series_overflow_total", metric="istio_requests_total")
        self._tcp_overflow = stats.counter("triomesh_istio_series_overflow_total", metric="istio_tcp_connections_opened_total")

    # ---- HTTP

    def record_request(self, ctx: RequestContext) -> None:
        """A request ended that `record_known` did not count (pipeline.finish): its series found or
        made, its counts recorded, and its key remembered when the table can count the next one."""
        if not self._clock_bound:
            self._bind_clock()
        if ctx.snapshot is not self._snapshot:
            self._new_snapshot(ctx.snapshot)
        facts = self._facts(ctx)
        series = self._by_facts.get(facts)
        if series is None:
            series = self._series_for(ctx)
            if series is None:
                self._overflow.value += 1
                return
            if len(self._by_facts) < 4 * self.max_series:
                self._by_facts[facts] = series
        extra = ctx.extra
        grpc_messages = extra.get("grpc_messages") if extra is not None and series.grpc else None
        if grpc_messages is not None:
            self.table.record(series.slot, ctx.start_monotonic, ctx.bytes_received, ctx.bytes_sent,
                              grpc_messages[0].messages, grpc_messages[1].messages)
        else:
            self.table.record(series.slot, ctx.start_monotonic, ctx.bytes_received, ctx.bytes_sent)
        self.table.remember(ctx, series.slot)

    @staticmethod
    def _facts(ctx: RequestContext) -> tuple:
        """What decides the labels of a request with peer facts, gRPC or response flags."""
        extra = ctx.extra
        if extra is None:
            peer = grpc_status = grpc_messages = None
        else:
            peer = extra.get("peer")
            grpc_status = extra.get("grpc_status")
            grpc_messages = extra.get("grpc_messages")
        listener = ctx.listener
        cluster = ctx.cluster
        flags = ctx.response_flags
        return (listener.name if listener is not None else "", cluster.name if cluster is not None else "",
                ctx.upstream_host, peer, ctx.status, ",".join(flags) if flags else "-", grpc_status,
                grpc_messages is not None)

    def _new_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._by_facts.clear()
        self._tcp_by_facts.clear()
        self.table.forget(snapshot)

    def _bind_clock(self) -> None:
        """The clock the request start times were read from (the Trio run's, unless one was given),
        bound on first use, inside the Trio run. Trio's SystemClock reads `offset + perf_counter()`
        in a Python method: the table reads the same monotonic clock itself and adds the offset read
        once; any other clock is called as it is."""
        if self.clock is not None:
            self.table.set_clock(0.0, self.clock)
        else:
            import trio

            clock = trio.lowlevel.current_clock()
            offset = getattr(clock, "offset", None)
            if (type(clock).__name__ == "SystemClock" and type(clock).__module__.startswith("trio.")
                    and isinstance(offset, float)):
                self.table.set_clock(offset)
            else:
                self.table.set_clock(0.0, clock.current_time)
        self._clock_bound = True

    def _series_for(self, ctx: RequestContext) -> Series | None:
        """The series of a request whose facts were not seen yet (None: the label-set cap is reached)."""
        extra = ctx.extra
        peer = extra.get("peer") if extra is not None else None
        grpc_status = extra.get("grpc_status") if extra is not None else None
        grpc = grpc_status is not None or (extra is not None and extra.get("grpc_messages") is not None)
        listener = ctx.listener
        inbound = listener is not None and listener.traffic_direction == "INBOUND"
        if inbound:
            source = peer.identity if peer is not None and peer.identity is not None else UNKNOWN_WORKLOAD
            service = peer.service if peer is not None else UNKNOWN_SERVICE
            security = peer.security_policy if peer is not None else "none"
            destination = self.identity_over_mtls if security == "mutual_tls" else self.identity
        else:
            destination = (peer.identity if peer is not None and peer.identity is not None
                           else endpoint_identity(ctx.endpoint, ctx.cluster))
            source = self.identity_over_mtls if destination.principal != UNKNOWN else self.identity
            service = service_labels(ctx.cluster)
            security = "unknown"  # Istio: only the destination knows how the connection was secured
        flags = ctx.response_flags
        labels = connection_labels("destination" if inbound else "source", source, destination, service,
                                   "grpc" if grpc else "http", security)
        labels += (("response_code", str(ctx.status)),
                   ("grpc_response_status", grpc_status.decode("ascii", "replace") if grpc_status is not None else ""),
                   ("response_flags", ",".join(flags) if flags else "-"))
        series = self._by_labels.get(labels)
        if series is None:
            if len(self._by_labels) >= self.max_series:
                return None
            series = self._by_labels[labels] = Series(self.stats, labels, self.table, len(self._by_labels), grpc)
        return series

    def note_local_principal(self, spiffe_id: str) -> None:
        """The workload certificate (re)loaded: our SPIFFE ID for the labels of mTLS traffic. Renewals
        keep the ID; a new one drops the cached label sets that named the old."""
        if spiffe_id != self.identity_over_mtls.principal:
            self.identity_over_mtls = replace(self.identity, principal=spiffe_id)
            self._by_facts.clear()
            self._tcp_by_facts.clear()
            self.table.forget(self._snapshot)

    def note_upstream_principal(self, endpoint_key: tuple[str, int], spiffe_id: str) -> None:
        """A mesh mTLS handshake with this endpoint proved `spiffe_id` (once per connection)."""
        principals = self.upstream_principals
        if len(principals) < MAX_UPSTREAM_PRINCIPALS or endpoint_key in principals:
            principals[endpoint_key] = spiffe_id

    # ---- TCP

    def tcp_series(self, inbound: bool, cluster: Cluster | None, endpoint: Endpoint | None,
                   peer_identity: WorkloadIdentity | None = None) -> TcpSeries | None:
        """The series a proxied TCP connection counts in (looked up once per connection).
        `peer_identity`: the other side as the TCP peer exchange and its certificate told it (a
        SPIFFE `principal` when the connection is mesh mTLS: connection_security_policy mutual_tls
        inbound); without it, the registry's (the destination endpoint's labels) or unknown."""
        facts = (inbound, cluster.name if cluster is not None else None, endpoint.key if endpoint is not None else None,
                 peer_identity)
        found = self._tcp_by_facts.get(facts)
        if found is not None:
            return found
        mutual_tls = peer_identity is not None and peer_identity.principal != UNKNOWN
        # our own principal on our side of a mesh mTLS connection
        own = self.identity_over_mtls if mutual_tls else self.identity
        labels = connection_labels(
            "destination" if inbound else "source",
            (peer_identity or UNKNOWN_WORKLOAD) if inbound else own,
            own if inbound else (peer_identity or endpoint_identity(endpoint, cluster)),
            UNKNOWN_SERVICE if inbound else service_labels(cluster),
            # Istio: only the destination knows how the connection was secured
            "tcp", ("mutual_tls" if mutual_tls else "none") if inbound else "unknown")
        series = self._tcp_by_labels.get(labels)
        if series is None:
            if len(self._tcp_by_labels) >= self.max_series:
                self._tcp_overflow.value += 1
                return None
            series = self._tcp_by_labels[labels] = TcpSeries(self.stats, labels)
        if len(self._tcp_by_facts) < 4 * self.max_series:
            self._tcp_by_facts[facts] = series
        return series


class PeerFacts:
    """What the peer metadata stage learnt of a request's other side, kept in ctx.extra["peer"]
    (made once per distinct peer and reused, so it can key the fast-path dict)."""

    __slots__ = ("identity", "service", "security_policy")

    def __init__(self, identity: WorkloadIdentity | None, service: ServiceLabels = UNKNOWN_SERVICE,
                 security_policy: str = "none") -> None:
        self.identity = identity
        self.service = service
        self.security_policy = security_policy
