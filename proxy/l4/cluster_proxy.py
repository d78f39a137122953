"""Proxy one accepted TCP connection to a cluster: the one endpoint pick (ClusterRuntime.pick),
connectionPool.tcp.maxConnections, DNS endpoints resolved when connecting, outlier feedback.

Used by every TCP route: a transparent sidecar's captured connections and a Gateway's TCP servers
(plain sockets, spliced), and a Gateway's TLS servers that terminate (a TlsConn, whose plaintext is
copied: proxy/tls/tcp.py). A cluster with TLS (auto mTLS to an endpoint with a sidecar, or a
DestinationRule `tls`) originates it to the endpoint, and the bytes are copied through OpenSSL by
the same pump; without TLS the splice path is untouched. The caller chose the cluster (its route);
this module owns the connection from then on.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import replace

import structlog
import trio

from proxy.config.snapshot import Snapshot
from proxy.l4 import connection_log
from proxy.l4.addrs import UpstreamAddr
from proxy.l4.connection_log import ConnectionClosed, ConnectionOpened
from proxy.l4.tcp_proxy import CopyMode, TcpProxyResult, TcpProxyStats, proxy_to_upstream
from proxy.l4.errors import ConnectFailure, LocalConnectFailure
from proxy.l7 import errors as l7_errors
from proxy.l7.connio import Conn
from proxy.l7.dataplane import ConnectionPick
from proxy.l7.upstream_conn import open_connection
from proxy.telemetry.istio_metrics import endpoint_identity
from proxy.telemetry.peer import WorkloadIdentity
from proxy.telemetry.peer_exchange import EMPTY_FRAME, PEER_EXCHANGE_ALPN, PeerExchangeError
from proxy.tls.conn import TlsConn, TlsError
from proxy.tls.peer_exchange import exchange
from proxy.tls.tcp import count_connect_failure, proxy_conns, proxy_tls_to_upstream

log = structlog.get_logger("triomesh.l4")

_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close() sends RST


class Outcome(enum.Enum):
    """What became of a connection handed to `proxy_to_cluster` (the `action` label of the callers'
    connection counters)."""

    PROXIED = "tcp"  # connected (or tried to: a connect failure is the TCP proxy's to count)
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"  # no cluster, no endpoint, or a DNS name not resolved
    OVERFLOW = "overflow"  # tcp.maxConnections reached


async def proxy_to_cluster(plane, snapshot: Snapshot, cluster_name: str, sock: socket.socket | TlsConn, client_ip: str,
                           original_destination: tuple[str, int] | None, *, stats: TcpProxyStats,
                           idle_timeout_s: float | None, initial: bytes = b"", inbound: bool = False,
                           peer_identity: WorkloadIdentity | None = None) -> Outcome:
    """Pick an endpoint of `cluster_name` for this connection and proxy `sock` to it until both
    sides are done, then write its access-log line. Takes ownership of `sock`: refused connections
    are reset, as Envoy's tcp_proxy resets a connection it cannot forward. `original_destination`:
    where the client was going before a capture redirect (resolution NONE clusters go there), None
    at a gateway. `inbound`: a sidecar's inbound connection (Istio's metrics report it as the
    destination); `peer_identity`: the client sidecar's facts and principal when it came over mesh
    mTLS (metrics: mutual_tls)."""
    line = ConnectionLogLine.open(plane, snapshot, sock, original_destination, inbound=inbound)
    outcome, closed = await _proxy(plane, snapshot, cluster_name, sock, client_ip, original_destination, stats=stats,
                                   idle_timeout_s=idle_timeout_s, initial=initial, inbound=inbound,
                                   peer_identity=peer_identity)
    if line is not None:
        line.emit(cluster_name, closed)
    return outcome


class ConnectionLogLine:
    """One TCP connection's access-log line: opened before it is proxied, written when it closes.
    Every proxied connection has one, PassthroughCluster's included, as Envoy's tcp_proxy logs them."""

    __slots__ = ("access_log", "text", "opened")

    def __init__(self, access_log, text: bool, opened: ConnectionOpened) -> None:
        self.access_log, self.text, self.opened = access_log, text, opened

    @classmethod
    def open(cls, plane, snapshot: Snapshot, sock: socket.socket | TlsConn,
             original_destination: tuple[str, int] | None, *, inbound: bool) -> ConnectionLogLine | None:
        """None when access logging is off for this side of the proxy."""
        access_log = plane.access_log
        text = False
        if access_log is not None and snapshot.access_logging is not None:
            # Telemetry accessLogging: a connection's line follows its side's `disabled` and provider
            # (a filter's attributes are a request's)
            choice = snapshot.access_logging.for_direction(inbound)
            access_log, text = (access_log if choice.enabled else None), choice.text
        if access_log is None:
            return None
        return cls(access_log, text, ConnectionOpened.of(sock, original_destination))

    def emit(self, cluster_name: str, closed: ConnectionClosed) -> None:
        self.access_log.emit_connection(connection_log.entry(self.opened, cluster_name, closed, self.access_log),
                                        text=self.text)


_NO_HEALTHY_UPSTREAM = (Outcome.NO_HEALTHY_UPSTREAM, ConnectionClosed("UH", "", None))


async def _proxy(plane, snapshot: Snapshot, cluster_name: str, sock: socket.socket | TlsConn, client_ip: str,
                 original_destination: tuple[str, int] | None, *, stats: TcpProxyStats,
                 idle_timeout_s: float | None, initial: bytes, inbound: bool,
                 peer_identity: WorkloadIdentity | None) -> tuple[Outcome, ConnectionClosed]:
    crt = plane.runtime(snapshot).clusters.get(cluster_name)
    cluster = crt.cluster if crt is not None else None
    if cluster is None or (not cluster.endpoints and (cluster.resolution != "NONE" or original_destination is None)):
        reset(sock)
        return _NO_HEALTHY_UPSTREAM
    endpoint = None
    if cluster.endpoints:
        # the one endpoint pick: balancer, hashing on the source IP, outlier ejections
        endpoint = crt.pick(ConnectionPick(client_ip.encode(), original_destination), plane.in_flight_of)
        if endpoint is None:
            reset(sock)
            return _NO_HEALTHY_UPSTREAM
        upstream = UpstreamAddr(endpoint.address, endpoint.port)
    else:  # resolution NONE: the app resolved the name itself; go where it was going
        upstream = UpstreamAddr(*original_destination)
    limit = crt.pool_limits.max_connections
    if limit is not None and crt.cx_active.value >= limit:  # connectionPool.tcp.maxConnections
        crt.rq_pending_overflow.value += 1
        reset(sock)
        return Outcome.OVERFLOW, ConnectionClosed("UO", str(upstream), None)
    originate = crt.tls is not None and endpoint is not None and originates_tls(plane, crt.tls[0], endpoint.key)
    if not originate and not is_ip(upstream.ip):
        # a DNS endpoint (resolution DNS): resolve when connecting, as Envoy's STRICT_DNS does
        try:
            infos = await trio.socket.getaddrinfo(upstream.ip, upstream.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.info("tcp upstream not resolved", cluster=cluster_name, host=upstream.ip, error=str(exc))
            reset(sock)
            return _NO_HEALTHY_UPSTREAM
        # IPv4 first when the name has both (Envoy's V4_PREFERRED; Istio asks V4_ONLY outside
        # dual-stack meshes)
        info = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
        upstream = UpstreamAddr.from_sockaddr(info[4])
    in_flight = plane.in_flight
    crt.cx_active.value += 1
    crt.cx_total.value += 1
    if endpoint is not None:
        in_flight[endpoint.key] = in_flight.get(endpoint.key, 0) + 1
    telemetry = plane.telemetry
    # over mesh mTLS the series waits for the handshake and the peer exchange (the peer's facts)
    series = [telemetry.tcp_series(inbound, cluster, endpoint, peer_identity)
              if telemetry is not None and not originate else None]
    if series[0] is not None:
        series[0].opened.value += 1
    result = None
    try:
        if originate:
            result = await _proxy_over_tls(plane, crt, endpoint, sock, initial, stats, idle_timeout_s, series)
        elif isinstance(sock, TlsConn):
            result = await proxy_tls_to_upstream(sock, upstream, stats=stats, connect_timeout_s=cluster.connect_timeout_s,
                                                 idle_timeout_s=idle_timeout_s)
        else:
            result = await proxy_to_upstream(sock, upstream, connect_timeout_s=cluster.connect_timeout_s,
                                             idle_timeout_s=idle_timeout_s, downstream_prefix=initial, stats=stats)
    finally:
        crt.cx_active.value -= 1
        if endpoint is not None:
            in_flight[endpoint.key] -= 1
        if series[0] is not None:
            series[0].closed.value += 1
            if result is not None:  # Envoy reports bytes periodically too; we count them when the connection closes
                series[0].sent_bytes.value += result.bytes_upstream_to_downstream
                series[0].received_bytes.value += result.bytes_downstream_to_upstream
    if endpoint is not None:  # connect failures and timeouts reach the outlier detector
        failed = result.error is not None and result.error.response_flag in ("UF", "UT")
        crt.record(endpoint, 503 if failed else 200, failed)
    if result.error is not None and result.error.source == "upstream":
        log.info("tcp upstream failed", cluster=cluster_name, upstream=str(upstream),
                 flag=result.error.response_flag, error=str(result.error))
    return Outcome.PROXIED, ConnectionClosed("", str(upstream), result)


def originates_tls(plane, settings, endpoint_key: tuple[str, int]) -> bool:
    """Whether a connection to this endpoint of a cluster with TLS settings is encrypted: auto mTLS
    only to endpoints with a sidecar and while this proxy holds a workload certificate (else plaintext,
    as Istio's auto mTLS falls back); a DestinationRule's tls always (a failure is the handshake's)."""
    if settings.mesh_endpoints is None:
        return True
    holder = plane.workload_identity
    return endpoint_key in settings.mesh_endpoints and holder is not None and holder.current is not None


async def _proxy_over_tls(plane, crt, endpoint, sock: socket.socket | TlsConn, initial: bytes, stats,
                          idle_timeout_s: float | None, series: list):
    """Connect and hand-shake TLS to the endpoint (the HTTP path's open_connection: SNI, SPIFFE ID or
    subjectAltNames checked, failures counted by reason), exchange peer facts when the server took
    the exchange's ALPN, open the connection's metrics series (`series[0]`), then copy plaintext."""
    downstream = sock if isinstance(sock, Conn) else Conn(sock, initial)
    telemetry = plane.telemetry
    cluster = crt.cluster
    try:
        upstream = await open_connection(endpoint.key, cluster.connect_timeout_s, crt.pool_limits.keepalive,
                                         plane, crt.tls, opaque=True)
    except l7_errors.ConnectFailure as exc:
        error = (LocalConnectFailure(str(exc), exc.reason) if isinstance(exc, l7_errors.LocalConnectFailure)
                 else ConnectFailure(str(exc)))
        error.__cause__ = exc
        return _not_connected(downstream, None, stats, error, telemetry, cluster, endpoint, series)
    except BaseException:
        downstream.close()
        raise
    peer = None
    principal = getattr(upstream, "peer_identity", None)  # ISTIO_MUTUAL: the server's SPIFFE ID
    if getattr(upstream, "alpn_protocol", None) == PEER_EXCHANGE_ALPN:
        try:
            peer = await exchange(upstream, telemetry.peer_frame if telemetry is not None else EMPTY_FRAME)
        except (PeerExchangeError, TlsError, OSError) as exc:
            error = ConnectFailure(f"peer exchange with {endpoint.host_port}: {exc}")
            error.__cause__ = exc
            return _not_connected(downstream, upstream, stats, error, telemetry, cluster, endpoint, series)
        except BaseException:
            downstream.close()
            upstream.close()
            raise
    if telemetry is not None:
        if principal is not None:
            peer = replace(peer or endpoint_identity(endpoint, cluster), principal=principal)
        series[0] = telemetry.tcp_series(False, cluster, endpoint, peer)
        if series[0] is not None:
            series[0].opened.value += 1
    return await proxy_conns(downstream, upstream, stats=stats, idle_timeout_s=idle_timeout_s)


def _not_connected(downstream: Conn, upstream: Conn | None, stats, error: ConnectFailure, telemetry, cluster, endpoint,
                   series: list) -> TcpProxyResult:
    """The upstream connection or its peer exchange failed: reset the client, count as the TCP proxy does."""
    count_connect_failure(stats, error)
    downstream.reset()
    if upstream is not None:
        upstream.close()
    if telemetry is not None:  # a connection that was opened and closed, labelled from the registry
        series[0] = telemetry.tcp_series(False, cluster, endpoint)
        if series[0] is not None:
            series[0].opened.value += 1
    return TcpProxyResult(mode=CopyMode.COPY, error=error)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def reset(sock: socket.socket | Conn) -> None:
    """Close with RST (SO_LINGER 0): the client sees the connection refused, not a clean end."""
    if isinstance(sock, Conn):  # a TLS connection after its handshake
        sock.reset()
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()
