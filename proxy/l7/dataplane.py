"""What one worker's HTTP data path shares across connections: snapshot holder, stats, access log,
upstream pools, and the per-snapshot derived state (stage chains, balancers), rebuilt on a swap."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import trio

from proxy.config.matchers import header_value, parse_query
from proxy.config.snapshot import Cluster, Endpoint
from proxy.l7.chain import Chain
from proxy.l7.stages.authorization import AuthorizationStage
from proxy.l7.stages.fault import FaultAbortStage, FaultDelayStage
from proxy.l7.stages.forwarding import ClientCertForwardingStage, ForwardingStage
from proxy.l7.stages.headers import ResponseHeadersStage
from proxy.l7.stages.peer_metadata import PeerMetadataStage
from proxy.l7.stages.routing import LOCAL_CLUSTER, RouteStage
from proxy.l7.reactor import Reactor
from proxy.l7.timeouts import TimeoutSweeper
from proxy.lb.balancers import hash64, make_balancer
from proxy.lb.locality import LocalityBalancer
from proxy.lb.outlier import OutlierDetector
from proxy.lb.pool import IdlePool
from proxy.l7.h2_upstream import sweep_idle
from proxy.stats import Counter, Gauge, Stats
from proxy.telemetry.istio_metrics import IstioMetrics
from proxy.tls.context import TlsSettingsError
from proxy.tls.mesh import MeshContexts
from proxy.tls.upstream import client_context_for
from proxy.telemetry.peer import PEER_HEADER

if TYPE_CHECKING:
    from proxy.config.snapshot import Listener, Route, Snapshot
    from proxy.l7.context import RequestContext
    from proxy.l7.stages.tracing import Tracing
    from proxy.runtime import SnapshotHolder

MIRRORS_IN_FLIGHT_MAX = 256  # per worker; beyond it a mirror is dropped (and counted), never queued
HOST_SELECTION_ATTEMPTS = 5  # Istio's host_selection_retry_max_attempts for the previous_hosts predicate


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Connection-manager limits and timeouts (Envoy's names in the comments)."""

    max_head_bytes: int = 60 * 1024  # max_request_headers_kb = 60
    max_headers: int = 100  # max_headers_count
    request_headers_timeout_s: float = 10.0  # request_headers_timeout
    idle_timeout_s: float = 300.0  # common_http_protocol_options.idle_timeout (downstream)
    stream_idle_timeout_s: float = 300.0  # stream_idle_timeout: no body byte either way for this long
    # route timeout when the VirtualService sets none: 0 disables it, as Istio configures Envoy
    # ("timeout ... default is disabled"), rather than Envoy's own 15 s
    route_timeout_s: float = 0.0
    connect_timeout_s: float = 10.0  # cluster connect_timeout when the config sets none
    upstream_idle_timeout_s: float = 60.0  # pooled idle upstream connections are closed after this
    max_idle_per_endpoint: int = 1024
    # request bodies up to this size are buffered so retries and mirrors can replay them; larger
    # ones stream to one upstream try (Envoy's per_request_buffer_limit_bytes serves the same purpose)
    retry_buffer_bytes: int = 64 * 1024
    # the overload manager's connection limit (proxy/overload.py): past it, accepted and closed
    max_downstream_connections: int | None = None


class ClusterRuntime:
    """A cluster's mutable companions for one snapshot: balancer over its healthy endpoints, outlier
    detector, circuit-breaker counters and stats handles. Kept across snapshots while the cluster's
    definition is unchanged, so ejections and balancer positions survive unrelated config changes."""

    __slots__ = ("cluster", "balancer", "cx_total", "cx_active", "cx_connect_fail", "rq_by_code", "stats",
                 "name", "outlier", "outlier_version", "hash_policy", "passthrough", "pool_limits", "pending",
                 "retries_active", "waiters", "rq_retry", "rq_retry_success", "rq_retry_overflow", "rq_timeout",
                 "rq_per_try_timeout", "rq_pending_overflow", "ejections_total", "ejections_active",
                 "fault_aborts", "fault_delays", "mirror_total", "mirror_dropped", "mirror_failed", "clock",
                 "rand_below", "rq_active", "rq_overflow", "http2", "tls", "tls_retired")

    def load_tls(self) -> None:
        """(Re)load the TLS context: once per snapshot, so rewritten certificate files take effect with the
        next snapshot (the context cache is keyed by the files' fingerprint)."""
        tls = self.cluster.tls
        if tls is None:
            return
        if tls.mode == "ISTIO_MUTUAL":  # the context follows the workload identity (open_connection)
            self.tls = (tls, None)
            return
        try:
            self.tls = (tls, client_context_for(tls))
        except TlsSettingsError as e:
            self.tls = (tls, e)

    def __init__(self, cluster: Cluster, stats: Stats, clock=trio.current_time, rand_below=random.randrange) -> None:
        self.cluster = cluster
        self.name = name = cluster.name
        self.stats = stats
        self.clock = clock
        self.rand_below = rand_below
        self.hash_policy = cluster.consistent_hash
        self.passthrough = cluster.lb_policy == "PASSTHROUGH"
        self.http2 = cluster.http2  # the upstream speaks HTTP/2 (h2_client.H2Exchange)
        # (settings, context) when the cluster originates TLS, the context made once, here (or the
        # error that kept it from being made: files gone since the config was checked)
        self.tls = None
        self.load_tls()
        # a later snapshot changed the cluster's TLS settings: connections made with these are not
        # pooled again (DataPlane._close_pools_with_changed_tls)
        self.tls_retired = False
        self.pool_limits = cluster.connection_pool
        self.outlier: OutlierDetector | None = None
        self.outlier_version = 0
        if cluster.outlier is not None and cluster.endpoints:
            self.outlier = OutlierDetector(cluster.endpoints, cluster.outlier, self._now())
        self.balancer = self._balancer_over(cluster.endpoints)
        self.pending = 0
        self.retries_active = 0
        self.rq_active = 0  # requests in the router step, for http2MaxRequests
        self.rq_overflow = stats.counter("triomesh_upstream_rq_overflow_total", cluster=name)
        self.waiters = trio.lowlevel.ParkingLot()
        self.cx_total = stats.counter("triomesh_upstream_cx_total", cluster=name)
        self.cx_active = stats.gauge("triomesh_upstream_cx_active", cluster=name)
        self.cx_connect_fail = stats.counter("triomesh_upstream_cx_connect_fail_total", cluster=name)
        self.rq_by_code: dict[int, Counter] = {}
        self.rq_retry = stats.counter("triomesh_upstream_rq_retry_total", cluster=name)
        self.rq_retry_success = stats.counter("triomesh_upstream_rq_retry_success_total", cluster=name)
        self.rq_retry_overflow = stats.counter("triomesh_upstream_rq_retry_overflow_total", cluster=name)
        self.rq_timeout = stats.counter("triomesh_upstream_rq_timeout_total", cluster=name)
        self.rq_per_try_timeout = stats.counter("triomesh_upstream_rq_per_try_timeout_total", cluster=name)
        self.rq_pending_overflow = stats.counter("triomesh_upstream_rq_pending_overflow_total", cluster=name)
        self.ejections_total = stats.counter("triomesh_outlier_ejections_total", cluster=name)
        self.ejections_active = stats.gauge("triomesh_outlier_ejections_active", cluster=name)
        self.fault_aborts = stats.counter("triomesh_fault_aborts_total", cluster=name)
        self.fault_delays = stats.counter("triomesh_fault_delays_total", cluster=name)
        self.mirror_total = stats.counter("triomesh_mirror_requests_total", cluster=name)
        self.mirror_dropped = stats.counter("triomesh_mirror_dropped_total", cluster=name)
        self.mirror_failed = stats.counter("triomesh_mirror_failed_total", cluster=name)

    def _now(self) -> float:
        try:
            return self.clock()
        except RuntimeError:  # built outside a Trio run (tests, config tools)
            return 0.0

    def count_response(self, status: int) -> None:
        c = self.rq_by_code.get(status)
        if c is None:
            c = self.rq_by_code[status] = self.stats.counter(
                "triomesh_upstream_rq_total", cluster=self.name, response_code=str(status))
        c.value += 1

    # ---- endpoint choice

    def pick(self, ctx: RequestContext, in_flight, avoid: set | None = None) -> Endpoint | None:
        """The endpoint for one try. `avoid`: hosts already tried (the previous_hosts predicate)."""
        od = self.outlier
        if od is not None:
            now = self.clock()
            if now >= od.next_sweep:
                od.sweep(now)
            if od.version != self.outlier_version:
                self._rebuild()
        if self.passthrough:
            return self._original_destination(ctx)
        if self.hash_policy is not None:
            return self.balancer.pick_hash(self._hash_key(ctx), avoid)
        balancer = self.balancer
        e = balancer.pick(in_flight)
        if avoid:
            for _ in range(HOST_SELECTION_ATTEMPTS):
                if e not in avoid:
                    break
                e = balancer.pick(in_flight)
        return e

    def _rebuild(self) -> None:
        od = self.outlier
        self.outlier_version = od.version
        self.ejections_active.value = od.ejected
        self.balancer = self._balancer_over(od.healthy())

    def _balancer_over(self, healthy):
        """The balancer over the endpoints that may be picked (all, or those outlier detection left)."""
        cluster = self.cluster
        if cluster.locality_lb is not None:
            return LocalityBalancer(cluster.locality_lb, healthy, cluster.lb_policy, self.rand_below, self.hash_policy)
        return make_balancer(cluster.lb_policy, healthy, self.rand_below, self.hash_policy)

    def record(self, endpoint: Endpoint, status: int, local: bool = False) -> None:
        """An upstream result for outlier detection (`local`: a connect failure, reset or timeout,
        given as 503/504)."""
        od = self.outlier
        if od is not None and od.record(endpoint, status, self.clock(), local):
            self.ejections_total.value += 1
            self._rebuild()

    def _original_destination(self, ctx: RequestContext) -> Endpoint | None:
        """PASSTHROUGH (Istio: "the original IP address requested by the caller"): the connection's
        destination before the capture redirect. Never the Host header, which would make an edge
        listener an open proxy; without an original destination there is no endpoint (503 UH)."""
        dst = ctx.original_destination
        if dst is None:
            return None
        return Endpoint(dst[0], dst[1])

    def _hash_key(self, ctx: RequestContext) -> int | None:
        hp = self.hash_policy
        head = ctx.request
        source = hp.source
        if head is None and source != "source_ip":
            return None  # a TCP connection has no headers, cookies or query to hash on
        if source == "header":
            value = head.authority if hp.name in (b"host", b":authority") else header_value(head, hp.name)
        elif source == "source_ip":
            value = ctx.downstream_ip
        elif source == "cookie":
            value = _cookie(head, hp.name)
            if value is None and hp.cookie_ttl_s is not None:
                value = self._new_cookie(ctx)
        else:
            value = parse_query(head.query).get(hp.name) if head.query else None
        return hash64(value) if value is not None else None

    def _new_cookie(self, ctx: RequestContext) -> bytes:
        """Envoy's generated hash cookie: a value derived from the downstream connection, sent back
        with Set-Cookie so the client's next requests hash the same."""
        hp = self.hash_policy
        value = b"%016x" % hash64(ctx.downstream_addr.encode() + (ctx.listener.name.encode() if ctx.listener else b""))
        parts = [hp.name + b"=" + value]
        if hp.cookie_ttl_s:
            parts.append(b"Max-Age=%d" % int(hp.cookie_ttl_s))
        if hp.cookie_path:
            parts.append(b"Path=" + hp.cookie_path)
        parts.append(b"HttpOnly")
        ctx.scratch()["set_cookie"] = b"; ".join(parts) + hp.cookie_attributes
        return value


class ConnectionPick:
    """What an endpoint pick knows of a proxied TCP connection (it has no request): the client's IP
    for consistentHash useSourceIp, and the original destination for PASSTHROUGH clusters. TCP
    routes pick through ClusterRuntime.pick with this, as HTTP requests and mirrors do with theirs."""

    __slots__ = ("downstream_ip", "original_destination", "request", "downstream_addr", "listener")

    def __init__(self, downstream_ip: bytes, original_destination: tuple[str, int] | None) -> None:
        self.downstream_ip = downstream_ip
        self.original_destination = original_destination
        self.request = None
        self.downstream_addr = ""
        self.listener = None


def _cookie(head, name: bytes) -> bytes | None:
    for n, v in head.headers:
        if n == b"cookie":
            for part in v.split(b";"):
                k, _, val = part.strip().partition(b"=")
                if k == name:
                    return val
    return None


def _routes_of(listener: Listener):
    table = listener.route_table
    vhosts = list(table.exact.values()) + [vh for _, vh in table.suffixes]
    if table.catch_all is not None:
        vhosts.append(table.catch_all)
    for vh in vhosts:
        yield from vh.routes


def _forwarding_stage(snapshot: Snapshot, listener: Listener, inbound: bool) -> ForwardingStage:
    """x-forwarded-client-cert as Istio configures each kind of listener (stages/forwarding.py): a
    sidecar's inbound appends the client's element, a Gateway's TLS server sets it, others remove it."""
    if inbound:
        return ClientCertForwardingStage(append=True, with_cert=False)
    if any(server.listener == listener.name for other in snapshot.listeners for server in other.tls_servers):
        return ClientCertForwardingStage(append=False, with_cert=True)
    return ForwardingStage()


def build_chain(snapshot: Snapshot, listener: Listener, clusters: dict[str, ClusterRuntime],
                stats: Stats | None = None, telemetry: IstioMetrics | None = None,
                tracing: Tracing | None = None) -> Chain:
    """The listener's stages; the optional ones only when some route, cluster or policy there needs them."""
    routes: list[Route] = list(_routes_of(listener))
    stages: list = []
    # the peer metadata exchange: on a sidecar's inbound side always, on an outbound listener only
    # when one of its routes reaches a mesh-internal cluster, as a destination or a mirror (a gateway
    # to MESH_EXTERNAL pays nothing); outbound, the upstream encoders send our header
    # (Chain.peer_header) and the peer stage only reads the response's.
    # Inbound it comes first: a request denied by authorization, unrouted or aborted by a fault is
    # still reported with its source workload, principal and service, as Istio reports it
    inbound = listener.traffic_direction == "INBOUND"
    peer_exchange = telemetry is not None and (inbound or any(
        snapshot.clusters[name].mesh_internal for r in routes
        for name in (*(d.cluster for d in r.destinations), *(m.cluster for m in r.mirrors))
        if name in snapshot.clusters))
    if peer_exchange and inbound:
        stages.append(PeerMetadataStage(telemetry, snapshot, inbound))
    if snapshot.authorization is not None and listener.name in snapshot.authorized_listeners:
        stages.append(AuthorizationStage(snapshot.authorization, stats if stats is not None else Stats(), listener.name))
    stages.append(RouteStage(snapshot, listener))
    if any(r.fault is not None and r.fault.delay_ppm for r in routes):
        stages.append(FaultDelayStage(clusters))
    if any(r.fault is not None and r.fault.abort_ppm for r in routes):
        stages.append(FaultAbortStage(clusters))
    outbound_peer_header = (PEER_HEADER, telemetry.identity.header_value()) if peer_exchange and not inbound else None
    stages.append(_forwarding_stage(snapshot, listener, inbound))
    if peer_exchange and not inbound:
        stages.append(PeerMetadataStage(telemetry, snapshot, inbound))
    if tracing is not None:  # only with a Zipkin collector configured (a proxy without loads none of it)
        from proxy.l7.stages.tracing import UPSTREAM_SPAN_START, TracingStage
        # first, so a request any stage answers locally still gets its server span; the client span
        # starts where the upstream call does, after the other stages
        policy = snapshot.tracing
        # Telemetry `randomSamplingPercentage` over the proxy's default (--trace-sampling)
        sampling_percent = (policy.sampling_percent if policy.sampling_percent is not None
                            else tracing.settings.sampling_percent)
        stages.insert(0, TracingStage(tracing, sampling_percent, report=not policy.disable_span_reporting))
        stages.append(UPSTREAM_SPAN_START)
    if snapshot.access_logging is not None:  # Telemetry accessLogging: the choice of this listener's side
        from proxy.l7.stages.access_log_policy import AccessLogPolicyStage

        stages.insert(0, AccessLogPolicyStage(snapshot.access_logging.for_direction(inbound)))
    cookie = any(c.consistent_hash is not None and c.consistent_hash.source == "cookie"
                 for c in snapshot.clusters.values())
    if cookie or any(r.response_headers is not None or r.destination_headers or r.cors is not None for r in routes):
        stages.append(ResponseHeadersStage())
    return Chain(tuple(stages), outbound_peer_header)


class SnapshotRuntime:
    """Derived, per-snapshot lookups: listeners by name, one chain per listener, cluster runtimes."""

    __slots__ = ("snapshot", "listeners", "chains", "clusters", "stats", "by_listener")

    def __init__(self, snapshot: Snapshot, stats: Stats, previous: SnapshotRuntime | None,
                 telemetry: IstioMetrics | None = None, tracing: Tracing | None = None) -> None:
        self.snapshot = snapshot
        self.stats = stats
        self.listeners: dict[str, Listener] = {l.name: l for l in snapshot.listeners}
        # keep balancer positions and outlier state for clusters whose definition did not change
        old = previous.clusters if previous is not None else {}
        self.clusters: dict[str, ClusterRuntime] = {}
        for name, cluster in snapshot.clusters.items():
            prev = old.get(name)
            if prev is not None and prev.cluster == cluster:
                if cluster.tls is not None:
                    prev.load_tls()
                self.clusters[name] = prev
            else:
                self.clusters[name] = ClusterRuntime(cluster, stats)
        # directResponse / redirect routes end in the exchange without an upstream
        # (its metrics stay out of the exported stats: it is no real cluster)
        self.clusters[LOCAL_CLUSTER.name] = old.get(LOCAL_CLUSTER.name) or ClusterRuntime(LOCAL_CLUSTER, Stats())
        self.chains: dict[str, Chain] = {l.name: build_chain(snapshot, l, self.clusters, stats, telemetry, tracing)
                                         for l in snapshot.listeners}
        # what a request looks up first: its listener and that listener's chain, in one lookup
        self.by_listener: dict[str, tuple[Listener, Chain]] = {
            name: (listener, self.chains[name]) for name, listener in self.listeners.items()}


class DataPlane:
    def __init__(self, holder: SnapshotHolder, stats: Stats, access_log: Any = None,
                 settings: HttpSettings | None = None, telemetry: IstioMetrics | None | bool = True,
                 tracing: Tracing | None = None) -> None:
        self.holder = holder
        self.tracing = tracing  # spans to a Zipkin collector, None without one
        self.stats = stats
        # Istio's standard metrics, on by default (True: with an unknown workload identity; False: off)
        self.telemetry: IstioMetrics | None = (
            IstioMetrics(stats) if telemetry is True else telemetry if isinstance(telemetry, IstioMetrics) else None)
        # pipeline.finish's one call per request into the metrics table (None: metrics off)
        self.record_known = self.telemetry.record_known if self.telemetry is not None else None
        self.access_log = access_log if access_log is not None and getattr(access_log, "enabled", False) else None
        self.settings = settings or HttpSettings()
        self._runtime: SnapshotRuntime | None = None
        # idle upstream connections by (cluster name, address, port); they outlive snapshots
        self.pools: dict[tuple[str, str, int], IdlePool] = {}
        # HTTP/2 upstream connections by (cluster name, address, port), shared by concurrent requests
        self.h2_pools: dict[tuple[str, str, int], list] = {}
        self.in_flight: dict[tuple[str, int], int] = {}
        in_flight = self.in_flight
        # requests in flight per endpoint, for LEAST_REQUEST picks (made once, not per request)
        self.in_flight_of = lambda e: in_flight.get(e.key, 0)
        s = self.settings
        # the workload certificate (an IdentityHolder: set by the worker when the proxy has a control
        # plane) and the mesh mTLS client contexts made from it, one per certificate
        self.workload_identity = None
        self.mesh_contexts = MeshContexts()
        # whether this worker's servers (mesh and Gateway) send resumable session tickets: set by the
        # worker from the proxy's worker count (proxy/tls/sessions.py, session_tickets_pay_off)
        self.session_tickets = True
        # a mesh mTLS connection was made: pools may hold connections of a certificate since renewed
        self.mesh_pooled = False
        self.reactor = Reactor()  # readiness of every HTTP connection of this worker, one epoll set
        self.sweeper = TimeoutSweeper(min(s.idle_timeout_s, s.request_headers_timeout_s), self.sweep_pools)
        self.downstream_cx_total = stats.counter("triomesh_downstream_cx_total")
        self.downstream_cx_active = stats.gauge("triomesh_downstream_cx_active")
        self._rq_by_code: dict[int, Counter] = {}
        self._by_flag: dict[str, Counter] = {}
        self.h2_connections = stats.gauge("triomesh_downstream_cx_http2_active")
        # a drain (proxy/runner) sets it once: every HTTP/1.1 response then says `connection: close`
        # and HTTP/2 connections get GOAWAY; `downstream` holds the open HTTP connections it reaches
        self.draining = False
        # the overload manager's memory watermark is crossed: new HTTP/1.1 requests get 503 OM
        self.shedding = False
        # draining or shedding: the one per-request check for both (rare states cost the common path nothing)
        self.degraded = False
        self.downstream: set = set()
        self._h2_mitigations: dict[str, Counter] = {}
        self._grpc_by_status: dict[bytes, Counter] = {}
        # where fire-and-forget work (mirrored requests) runs; the runner may set a nursery, else
        # each task is a Trio system task (a mirror never fails or delays the request it copies)
        self.background: trio.Nursery | None = None
        self.mirrors_in_flight = 0
        # Trio's clock: trio.current_time() until use_run_clock() binds the run's clock object
        self.now: Callable[[], float] = trio.current_time

    def use_run_clock(self) -> None:
        """Read Trio's clock through the running clock object's own bound method (each HTTP/1.1
        downstream connection calls this as it starts). It is the clock trio.current_time() reads, so
        deadlines and a trio.testing.MockClock keep working, without that function's run-context
        lookup and KI-protection wrapping (three reads per HTTP/1.1 request)."""
        self.now = trio.lowlevel.current_clock().current_time

    def start_drain(self, *, close_idle: bool = True) -> None:
        """From now on no connection is kept alive: idle ones close (unless `close_idle` is False:
        then they close after their next response, or at close_idle_downstream), busy ones after
        their response."""
        self.draining = True
        self.degraded = True
        for connection in list(self.downstream):
            connection.drain(close_idle=close_idle)

    def close_idle_downstream(self) -> None:
        """Close the HTTP/1.1 connections waiting for a next request (a drain's later step)."""
        for connection in list(self.downstream):
            connection.close_if_idle()

    def set_shedding(self, active: bool) -> None:
        """The memory watermark was crossed (up or down)."""
        self.shedding = active
        self.degraded = self.draining or active

    def reset_downstream(self) -> None:
        """The drain deadline: reset every HTTP connection still open."""
        for connection in list(self.downstream):
            connection.conn.reset()

    def spawn(self, fn, *args) -> None:
        if self.background is not None:
            self.background.start_soon(fn, *args)
        else:
            trio.lowlevel.spawn_system_task(fn, *args)

    def runtime(self, snapshot: Snapshot) -> SnapshotRuntime:
        rt = self._runtime
        if rt is None or rt.snapshot is not snapshot:
            previous = rt
            rt = self._runtime = SnapshotRuntime(snapshot, self.stats, previous, self.telemetry, self.tracing)
            if previous is not None:
                self._close_pools_with_changed_tls(previous, rt)
        return rt

    def _close_pools_with_changed_tls(self, previous: SnapshotRuntime, current: SnapshotRuntime) -> None:
        """A cluster whose TLS settings changed must not lend connections made with the old ones: its
        idle HTTP/1.1 connections close, its HTTP/2 ones take no new stream (and close once idle),
        and connections of requests still running with the old settings are not pooled again."""
        changed = set()
        for name, old in previous.clusters.items():
            new = current.clusters.get(name)
            if new is not None and old is not new and old.cluster.tls != new.cluster.tls:
                old.tls_retired = True
                changed.add(name)
        if not changed:
            return
        for key in [k for k in self.pools if k[0] in changed]:
            for conn in self.pools.pop(key).drain():
                conn.close()
                if conn.counted:
                    conn.counted = False
                    self.stats.gauge("triomesh_upstream_cx_active", cluster=key[0]).value -= 1
        for key in [k for k in self.h2_pools if k[0] in changed]:
            for connection in list(self.h2_pools.get(key, ())):
                connection.draining = True
                if connection.ready.is_set() and not connection.streams:
                    connection.close()

    def load_identity(self, identity) -> None:
        """A workload certificate, first or renewed (`self.workload_identity` holds it): the metrics
        learn our SPIFFE ID, and pooled connections made with the old certificate are retired."""
        self.workload_identity.swap(identity)
        if self.telemetry is not None:
            self.telemetry.note_local_principal(identity.spiffe_id)
        self.retire_renewed_connections()

    def retire_renewed_connections(self) -> None:
        """Close the idle pooled connections made with a workload certificate that has since been
        renewed, so new requests get connections with the new one. Called when the identity is
        swapped and by every pool sweep (for connections busy at the swap, closed once idle)."""
        holder = self.workload_identity
        current = holder.current if holder is not None else None

        def renewed(conn) -> bool:
            made_with = getattr(conn, "mesh_identity", None)
            return made_with is not None and made_with is not current

        for key in list(self.pools):
            for conn in self.pools[key].drop_where(renewed):
                conn.close()
                if conn.counted:
                    conn.counted = False
                    self.stats.gauge("triomesh_upstream_cx_active", cluster=key[0]).value -= 1
            if not self.pools[key].idle:
                del self.pools[key]

    def current_clusters(self) -> dict[str, ClusterRuntime]:
        """Cluster runtimes of the snapshot being served now (for work that outlives its request's
        stage loop, such as mirrors)."""
        rt = self._runtime
        if rt is None or rt.snapshot is not self.holder.current:
            rt = self.runtime(self.holder.current)
        return rt.clusters

    def sweep_pools(self) -> None:
        """Close idle upstream connections that expired, or whose cluster or endpoint left the
        active snapshot (otherwise they would wait for a checkout of the same key that never comes)."""
        now = self.now()
        clusters = self.holder.current.clusters
        for key in list(self.pools):
            cluster_name, address, port = key
            pool = self.pools[key]
            cluster = clusters.get(cluster_name)
            gone = cluster is None or (cluster.lb_policy != "PASSTHROUGH" and not any(
                e.address == address and e.port == port for e in cluster.endpoints))
            for conn in (pool.drain() if gone else pool.drop_expired(now)):
                conn.close()
                if conn.counted:
                    conn.counted = False
                    self.stats.gauge("triomesh_upstream_cx_active", cluster=cluster_name).value -= 1
            if not pool.idle:
                del self.pools[key]
        if self.mesh_pooled:
            self.retire_renewed_connections()
        if self.h2_pools:
            sweep_idle(self, now)

    def pool(self, key: tuple[str, str, int], idle_timeout_s: float | None = None) -> IdlePool:
        """Idle connections of one cluster endpoint; `idle_timeout_s`: the cluster's
        connectionPool.http.idleTimeout (None: the default)."""
        pool = self.pools.get(key)
        timeout = self.idle_timeout_s(idle_timeout_s)
        if pool is None:
            pool = self.pools[key] = IdlePool(max_idle=self.settings.max_idle_per_endpoint, idle_timeout_s=timeout)
        elif pool.idle_timeout_s != timeout:
            pool.idle_timeout_s = timeout  # the cluster's policy changed with a new snapshot
        return pool

    def idle_timeout_s(self, configured: float | None) -> float:
        """A pool's idle timeout: the cluster's connectionPool.http.idleTimeout, else the default."""
        return configured if configured is not None else self.settings.upstream_idle_timeout_s

    def count_downstream(self, status: int, flags: list[str]) -> None:
        c = self._rq_by_code.get(status)
        if c is None:
            c = self._rq_by_code[status] = self.stats.counter("triomesh_downstream_rq_total", response_code=str(status))
        c.value += 1
        for flag in flags:
            f = self._by_flag.get(flag)
            if f is None:
                f = self._by_flag[flag] = self.stats.counter("triomesh_response_flags_total", flag=flag)
            f.value += 1

    def count_grpc(self, grpc_status: bytes) -> None:
        """A gRPC response went downstream with this grpc-status (a number, as the wire says it)."""
        # gRPC defines 0-16: anything else is one label, so an upstream cannot grow the stats without bound
        label = grpc_status if grpc_status.isdigit() and len(grpc_status) <= 2 else b"other"
        c = self._grpc_by_status.get(label)
        if c is None:
            c = self._grpc_by_status[label] = self.stats.counter("triomesh_downstream_grpc_rq_total",
                                                                 grpc_status=label.decode())
        c.value += 1

    def count_h2_mitigation(self, kind: str) -> None:
        """An HTTP/2 protocol error or attack pattern refused (h2_server.py names the kinds)."""
        c = self._h2_mitigations.get(kind)
        if c is None:
            c = self._h2_mitigations[kind] = self.stats.counter("triomesh_h2_mitigations_total", kind=kind)
        c.value += 1

    def gauge(self, name: str, **labels: str) -> Gauge:
        return self.stats.gauge(name, **labels)
