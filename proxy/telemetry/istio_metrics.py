"""Istio's standard metrics (istio_requests_total, the duration and size histograms, the TCP
counters) with Istio's label set, filled as Istio's stats filter fills them.

Theory of operation. A request ends in `record_request`: the facts that decide its labels (which
listener, cluster and endpoint it went through, the peer's identity if a peer sidecar told it, the
response code, flags and gRPC status) form one tuple, and a dict maps that tuple to the `Series`
whose metric objects it bumps: no string is built per request. Only the first request with a new
tuple takes the slow path (`_series_for`), which derives the label values and finds or makes the
series for them. The fast-path dict is emptied when the snapshot changes (the facts' meaning may
change with it); the series themselves, which hold the counts, stay.

Cardinality is bounded as Istio bounds it: anything not known is `unknown`, peer metadata values
are restricted to name characters (peer.py), and the number of label sets per worker is capped
(MAX_SERIES); requests beyond the cap are counted in triomesh_istio_series_overflow_total and not
reported in Istio's metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from math import ceil
from time import perf_counter
from typing import TYPE_CHECKING

from proxy.stats import HELP, Stats
from proxy.telemetry.peer import UNKNOWN, UNKNOWN_WORKLOAD, WorkloadIdentity, canonical_revision, canonical_service
from proxy.telemetry.peer_exchange import encode_frame

if TYPE_CHECKING:
    from proxy.config.snapshot import Cluster, Endpoint, Snapshot
    from proxy.l7.context import RequestContext

# Envoy's default histogram buckets (HistogramSettingsImpl::defaultBuckets), used by Istio for the
# duration (milliseconds) and size (bytes) histograms alike
# (floats: bisecting a float among floats is cheaper than among ints)
DEFAULT_BUCKETS: tuple[float, ...] = (0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                                      10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0)
# Bucket indices by table rather than by bisecting (the C bisect costs as much as the rest of an
# observation) for the common small values: a byte count below SMALL_SIZE_BYTES indexes its bucket;
# as every bound is a multiple of 0.5, a duration of d ms below SMALL_DURATION_MS is in the bucket of
# ceil(2 d) / 2 (bounds are inclusive: exactly 0.5 is in le="0.5", anything above it in the next).
SMALL_SIZE_BYTES = 4096
_SMALL_SIZE_BUCKET = [bisect_left(DEFAULT_BUCKETS, n) for n in range(SMALL_SIZE_BYTES)]
SMALL_DURATION_MS = 1000.0
_SMALL_DURATION_BUCKET = [bisect_left(DEFAULT_BUCKETS, half / 2) for half in range(2 * int(SMALL_DURATION_MS) + 1)]
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
    """The metric objects of one label set of the HTTP metrics (the message counters: gRPC only)."""

    __slots__ = ("requests", "duration_ms", "request_bytes", "response_bytes", "request_messages", "response_messages",
                 "duration_counts", "request_bytes_counts", "response_bytes_counts")

    def __init__(self, stats: Stats, labels: tuple[tuple[str, str], ...], grpc: bool = False) -> None:
        self.request_messages = stats.counter_with_labels("istio_request_messages_total", labels) if grpc else None
        self.response_messages = stats.counter_with_labels("istio_response_messages_total", labels) if grpc else None
        self.duration_ms = stats.histogram("istio_request_duration_milliseconds", labels, DEFAULT_BUCKETS)
        self.request_bytes = stats.histogram("istio_request_bytes", labels, DEFAULT_BUCKETS)
        self.response_bytes = stats.histogram("istio_response_bytes", labels, DEFAULT_BUCKETS)
        # one request, one duration: the request count is the duration histogram's, not kept twice
        self.requests = stats.counter_of_histogram("istio_requests_total", labels, self.duration_ms)
        # the histograms' own count lists, one attribute away from the hot path
        self.duration_counts = self.duration_ms.counts
        self.request_bytes_counts = self.request_bytes.counts
        self.response_bytes_counts = self.response_bytes.counts


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
        self._now = None  # the clock function (bound on first use); the run's clock reads it plus _clock_offset
        self._clock_offset = 0.0
        self.max_series = max_series
        self._snapshot: Snapshot | None = None
        self._by_facts: dict[tuple, Series | None] = {}
        self._by_labels: dict[tuple, Series] = {}
        self._tcp_by_facts: dict[tuple, TcpSeries | None] = {}
        self._tcp_by_labels: dict[tuple, TcpSeries] = {}
        self._overflow = stats.counter("triomesh_istio_series_overflow_total", metric="istio_requests_total")
        self._tcp_overflow = stats.counter("triomesh_istio_series_overflow_total", metric="istio_tcp_connections_opened_total")

    # ---- HTTP

    def record_request(self, ctx: RequestContext) -> None:
        """A request ended (from pipeline.finish): one count, three observations."""
        if ctx.snapshot is not self._snapshot:
            self._new_snapshot(ctx.snapshot)
        listener = ctx.listener
        cluster = ctx.cluster
        # what decides the labels, in values whose hash is cached (str) or cheap; upstream_host stands
        # for the endpoint ("" when none was picked). The common request (no peer facts, no gRPC, no
        # response flag) is told by four of them; a tuple of another length cannot equal it.
        if ctx.extra is None and not ctx.response_flags and listener is not None and cluster is not None:
            facts = (listener.name, cluster.name, ctx.upstream_host, ctx.status)
        else:
            facts = self._facts(ctx)
        series = self._by_facts.get(facts)
        if series is None:
            series = self._series_for(ctx)
            if series is None:
                self._overflow.value += 1
                return
            if len(self._by_facts) < 4 * self.max_series:
                self._by_facts[facts] = series
        # Histogram.observe inlined (three method calls cost more than the rest of this function)
        now = self._now
        if now is None:
            now = self._bind_clock()
        value = (now() + self._clock_offset - ctx.start_monotonic) * 1000.0
        series.duration_counts[_SMALL_DURATION_BUCKET[ceil(value * 2.0)] if 0.0 <= value < SMALL_DURATION_MS
                               else bisect_left(DEFAULT_BUCKETS, value)] += 1
        series.duration_ms.sum += value
        value = ctx.bytes_received
        if value:
            series.request_bytes_counts[_SMALL_SIZE_BUCKET[value] if value < SMALL_SIZE_BYTES
                                        else bisect_left(DEFAULT_BUCKETS, value)] += 1
            series.request_bytes.sum += value
        else:  # no request body (most requests): the first bucket, nothing to add to the sum
            series.request_bytes_counts[0] += 1
        value = ctx.bytes_sent
        series.response_bytes_counts[_SMALL_SIZE_BUCKET[value] if value < SMALL_SIZE_BYTES
                                     else bisect_left(DEFAULT_BUCKETS, value)] += 1
        series.response_bytes.sum += value
        if series.request_messages is not None:
            grpc_messages = ctx.extra.get("grpc_messages")
            if grpc_messages is not None:
                series.request_messages.value += grpc_messages[0].messages
                series.response_messages.value += grpc_messages[1].messages

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

    def _bind_clock(self):
        """The clock the request start times were read from (the Trio run's, unless one was given),
        bound on first use, inside the Trio run. Trio's SystemClock reads `offset + perf_counter()`
        in a Python method: perf_counter itself plus the offset read once is the same sum without a
        Python call per request; any other clock is called as it is."""
        if self.clock is not None:
            self._now = self.clock
        else:
            import trio

            clock = trio.lowlevel.current_clock()
            offset = getattr(clock, "offset", None)
            if (type(clock).__name__ == "SystemClock" and type(clock).__module__.startswith("trio.")
                    and isinstance(offset, float)):
                self._now, self._clock_offset = perf_counter, offset
            else:
                self._now = clock.current_time
        return self._now

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
            series = self._by_labels[labels] = Series(self.stats, labels, grpc)
        return series

    def note_local_principal(self, spiffe_id: str) -> None:
        """The workload certificate (re)loaded: our SPIFFE ID for the labels of mTLS traffic. Renewals
        keep the ID; a new one drops the cached label sets that named the old."""
        if spiffe_id != self.identity_over_mtls.principal:
            self.identity_over_mtls = replace(self.identity, principal=spiffe_id)
            self._by_facts.clear()
            self._tcp_by_facts.clear()

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
