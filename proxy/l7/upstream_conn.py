"""Upstream HTTP/1.1 connections: connect, and lend them from per-endpoint idle pools under the
cluster's connectionPool limits (Envoy's circuit breakers: maxConnections, pending requests).

A connection is lent to one request at a time and comes back with `release` (pooled when the
response ended cleanly) or `discard` (closed). Checkout from the idle pool never awaits, so the
common keep-alive case costs no coroutine; `acquire` waits for a slot or connects.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import wait_writable

from proxy.l7.connio import Conn
from proxy.exhaustion import exhaustion_reason
from proxy.l7.errors import ConnectFailure, LocalConnectFailure, Overflow, UpstreamTlsFailure
from proxy.stats import HELP
from proxy.tls.conn import TlsConn, TlsError
from proxy.tls.mesh import check_peer_identity
from proxy.tls.upstream import check_subject_alt_names

if TYPE_CHECKING:
    from proxy.l7.dataplane import ClusterRuntime, DataPlane

# A connection idle for less than this is reused without first peeking whether the upstream closed
# it: keep-alive timeouts are seconds, and the rare race is covered by the stale-connection retry.
PEEK_AFTER_IDLE_S = 1.0

HELP.setdefault("triomesh_upstream_cx_local_fail_total",
                "Upstream connects that failed on our side (out of descriptors, memory, buffers, ports), by "
                "reason; answered 503 UF and not held against the endpoint.")
HELP.setdefault("triomesh_upstream_tls_session_reused_total",
                "TLS connections to upstreams that resumed a kept session (a ticket) instead of a full "
                "handshake (Envoy's ssl.session_reused).")
HELP.setdefault("triomesh_upstream_tls_handshake_fail_total",
                "TLS handshakes to upstreams (DestinationRule tls) that failed, by reason (fail_verify_error, "
                "fail_verify_san, handshake_timeout, ...); answered 503 UF like a failed connect.")

def _init_upstream(conn, key: tuple[str, int]) -> None:
    conn.key = key
    conn.pool_key = None  # (cluster, address, port), set by acquire
    conn.requests = 0
    conn.counted = True  # still included in the cluster's cx_active gauge
    conn.idle_since = 0.0
    conn.created = 0.0


def _conn_settings(plane: DataPlane | None) -> dict:
    if plane is None:
        return {}
    # the worker's epoll set, and the stream idle timeout on every read and write
    return {"reactor": plane.reactor, "sweeper": plane.sweeper, "idle_s": plane.settings.stream_idle_timeout_s}


class UpstreamConn(Conn):
    __slots__ = ("key", "pool_key", "requests", "counted", "idle_since", "created")

    def __init__(self, sock: socket.socket, key: tuple[str, int], plane: DataPlane | None = None) -> None:
        super().__init__(sock, **_conn_settings(plane))
        _init_upstream(self, key)


class UpstreamTlsConn(TlsConn):
    """An upstream connection over TLS (DestinationRule tls): the same bookkeeping as UpstreamConn."""

    __slots__ = ("key", "pool_key", "requests", "counted", "idle_since", "created", "peer_identity", "mesh_identity")

    def __init__(self, sock: socket.socket, key: tuple[str, int], context, server_hostname: str,
                 plane: DataPlane | None = None, session=None) -> None:
        super().__init__(sock, context, server_side=False, server_hostname=server_hostname, session=session,
                         **_conn_settings(plane))
        _init_upstream(self, key)
        self.peer_identity: str | None = None  # ISTIO_MUTUAL: the server's verified SPIFFE ID
        # ISTIO_MUTUAL: the workload certificate it was made with (retired from the pools once renewed)
        self.mesh_identity = None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _set_keepalive(sock: socket.socket, keepalive) -> None:
    """connectionPool.tcp.tcpKeepalive: SO_KEEPALIVE plus the probe settings the OS offers."""
    probes, idle_s, interval_s = keepalive
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in ((getattr(socket, "TCP_KEEPCNT", None), probes),
                       (getattr(socket, "TCP_KEEPIDLE", None), idle_s),
                       (getattr(socket, "TCP_KEEPINTVL", None), interval_s)):
        if opt is not None and value:
            sock.setsockopt(socket.IPPROTO_TCP, opt, max(1, int(value)))


async def open_connection(key: tuple[str, int], timeout_s: float, keepalive=None,
                          plane: DataPlane | None = None, tls=None, *, opaque: bool = False) -> UpstreamConn | UpstreamTlsConn:
    """A connected upstream socket; with `tls` (ClusterRuntime.tls) the TLS handshake follows within
    the same connect timeout. `opaque`: for the TCP proxy, whose connections wait with Trio's own
    registration and have the TCP idle timeout instead of the HTTP stream idle sweep."""
    if tls is None:
        return await _connect(key, timeout_s, keepalive, plane, opaque)
    settings, context = tls
    identity = None
    if context is None:  # ISTIO_MUTUAL: the workload certificate of now (renewal: new connections use the new one)
        holder = plane.workload_identity if plane is not None else None
        identity = holder.current if holder is not None else None
        if settings.mesh_endpoints is not None and (identity is None or key not in settings.mesh_endpoints):
            return await _connect(key, timeout_s, keepalive, plane, opaque)  # auto mTLS: no sidecar there, or no identity
        if identity is None:
            _count_tls_failure(plane, "no_workload_certificate")
            raise UpstreamTlsFailure(f"tls to {key[0]}:{key[1]}: ISTIO_MUTUAL needs the workload certificate, which "
                                     f"this proxy has not received ({settings.origin})", "no_workload_certificate")
        context = plane.mesh_contexts.client(identity, settings.alpn)
    if isinstance(context, Exception):  # the cluster's certificate files could not be loaded
        _count_tls_failure(plane, "bad_settings")
        raise UpstreamTlsFailure(f"tls to {key[0]}:{key[1]}: {context} ({settings.origin})", "bad_settings") from context
    deadline = plane.now() + timeout_s
    sock = await _connect_socket(key, timeout_s, keepalive, plane)
    # the server's kept session, resumed when it takes it (proxy/tls/sessions.py)
    session_key = (key, settings.sni)
    try:
        conn = UpstreamTlsConn(sock, key, context, settings.sni, None if opaque else plane,
                               context.sessions.get(session_key))
    except BaseException:
        sock.close()
        raise
    try:
        await conn.handshake(max(0.0, deadline - plane.now()))
        if identity is not None:
            conn.mesh_identity = identity
            plane.mesh_pooled = True
            conn.peer_identity = check_peer_identity(conn.peer_certificate(), settings.subject_alt_names,
                                                     identity.spiffe_id)
            if plane.telemetry is not None:  # destination_principal of the requests this connection carries
                plane.telemetry.note_upstream_principal(key, conn.peer_identity)
        else:
            check_subject_alt_names(settings, conn.peer_certificate())
        conn.session_key = session_key  # checked: its session may be resumed
        if conn.session_reused:
            plane.stats.counter("triomesh_upstream_tls_session_reused_total").value += 1
    except BaseException as e:
        conn.close()
        if isinstance(e, TlsError):
            _count_tls_failure(plane, e.reason)
            why = str(e)  # a failed certificate check says why (OpenSslError.verify_message)
            raise UpstreamTlsFailure(f"tls to {key[0]}:{key[1]} (sni {settings.sni}): {why}", e.reason) from e
        if isinstance(e, OSError):
            _count_tls_failure(plane, "connection_error")
            raise UpstreamTlsFailure(f"tls to {key[0]}:{key[1]} (sni {settings.sni}): {e}", "connection_error") from e
        raise
    return conn


def _count_tls_failure(plane: DataPlane | None, reason: str) -> None:
    if plane is not None:
        plane.stats.counter("triomesh_upstream_tls_handshake_fail_total", reason=reason).value += 1


async def _connect(key: tuple[str, int], timeout_s: float, keepalive, plane: DataPlane | None,
                   opaque: bool = False) -> UpstreamConn:
    return UpstreamConn(await _connect_socket(key, timeout_s, keepalive, plane), key, None if opaque else plane)


async def _connect_socket(key: tuple[str, int], timeout_s: float, keepalive, plane: DataPlane | None) -> socket.socket:
    """A connected non-blocking socket, not yet wrapped: the caller makes the one connection object
    (a plain one, or TLS over it) that registers with the worker's reactor and sweeper."""
    host, port = key
    sock: socket.socket | None = None
    with trio.move_on_after(timeout_s):
        if _is_ip(host):
            family, sockaddr = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
        else:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise ConnectFailure(f"resolve {host}: {e}") from None
            family, _, _, _, sockaddr = infos[0]
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors or memory: ours to answer, never "the client left"
            raise _local_failure(plane, host, port, e.errno, e) from e
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if keepalive is not None:
                _set_keepalive(sock, keepalive)
            err = sock.connect_ex(sockaddr)
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException as e:
            sock.close()
            if isinstance(e, OSError):
                raise _local_failure(plane, host, port, e.errno, e) from e
            raise
        if err:
            sock.close()
            if exhaustion_reason(err) is not None:  # ENOBUFS, no ephemeral port left: ours too
                raise _local_failure(plane, host, port, err, os.strerror(err))
            raise ConnectFailure(f"connect {host}:{port}: {errno.errorcode.get(err, err)}")
        return sock
    if sock is not None:
        sock.close()
    raise ConnectFailure(f"connect {host}:{port}: timeout after {timeout_s}s")


def _local_failure(plane: DataPlane | None, host: str, port: int, err: int | None, cause) -> ConnectFailure:
    """The error for an upstream socket that could not be made or connected for a reason on our
    side (LocalConnectFailure, counted by reason); any other OS error is a plain connect failure."""
    reason = exhaustion_reason(err)
    if reason is None:
        return ConnectFailure(f"connect {host}:{port}: {cause}")
    if plane is not None:
        plane.stats.counter("triomesh_upstream_cx_local_fail_total", reason=reason).value += 1
    return LocalConnectFailure(f"connect {host}:{port}: {cause}", reason)


def checkout_idle(plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int], now: float) -> UpstreamConn | None:
    """A pooled idle connection to `key` that may be reused now, or None (no await: the common
    keep-alive case costs no coroutine)."""
    pool = plane.pools.get((crt.name, key[0], key[1]))  # per cluster and host, as Envoy's pools
    if pool is None or not pool.idle:
        return None
    limits = crt.pool_limits
    timeout = plane.idle_timeout_s(limits.idle_timeout_s)
    if pool.idle_timeout_s != timeout:
        pool.idle_timeout_s = timeout  # the cluster's idleTimeout changed with a new snapshot
    while True:
        conn, expired = pool.checkout(now)
        for old in expired:
            discard(crt, old)
        if conn is None:
            return None
        if (now - conn.idle_since >= PEEK_AFTER_IDLE_S and conn.peek_closed()) or (
                limits.max_connection_duration_s is not None
                and now - conn.created >= limits.max_connection_duration_s):
            discard(crt, conn)
            continue
        return conn


async def acquire(plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int], *,
                  fresh: bool = False, deadline: float = math.inf) -> tuple[UpstreamConn, bool]:
    """(connection, reused); `fresh` skips the idle pool.

    Circuit breaker (connectionPool): with tcp.maxConnections open, a request waits for one to come
    back, at most until `deadline` or the connect timeout, and only if fewer than
    http.http1MaxPendingRequests already wait; otherwise it fails at once with 503 UO (Overflow)."""
    limits = crt.pool_limits
    timeout = crt.cluster.connect_timeout_s or plane.settings.connect_timeout_s
    while True:
        now = plane.now()
        if not fresh:
            conn = checkout_idle(plane, crt, key, now)
            if conn is not None:
                return conn, True
        limit = limits.max_connections
        if limit is None or crt.cx_active.value < limit or _close_idle_elsewhere(plane, crt):
            break
        if limits.max_pending_requests is not None and crt.pending >= limits.max_pending_requests:
            crt.rq_pending_overflow.value += 1
            raise Overflow(f"cluster {crt.name}: {limit} connections open and {crt.pending} requests pending")
        crt.pending += 1
        try:
            with trio.move_on_at(min(deadline, now + timeout)) as scope:
                await crt.waiters.park()
        finally:
            crt.pending -= 1
        if scope.cancelled_caught:
            crt.rq_pending_overflow.value += 1
            raise Overflow(f"cluster {crt.name}: no connection became free within {timeout}s")
        fresh = False
    crt.cx_active.value += 1  # counted from the attempt on, so concurrent opens respect the limit
    try:
        conn = await open_connection(key, timeout, limits.keepalive, plane, crt.tls)
    except BaseException as e:
        crt.cx_active.value -= 1
        if crt.pending:
            crt.waiters.unpark()
        if isinstance(e, ConnectFailure):
            crt.cx_connect_fail.value += 1
        raise
    crt.cx_total.value += 1
    conn.created = plane.now()
    conn.pool_key = (crt.name, key[0], key[1])
    return conn, False


def _close_idle_elsewhere(plane: DataPlane, crt: ClusterRuntime) -> bool:
    """At the connection limit: close one idle connection of another endpoint of the cluster, so a
    request for this endpoint can open one (the limit counts the cluster's connections)."""
    name = crt.name
    for pool_key, pool in plane.pools.items():
        if pool_key[0] == name and pool.idle:
            conn = pool.idle.pop(0)[0]
            discard(crt, conn)
            return True
    return False


def discard(crt: ClusterRuntime, conn: UpstreamConn) -> None:
    conn.close()
    if conn.counted:
        conn.counted = False
        crt.cx_active.value -= 1
        if crt.pending:
            crt.waiters.unpark()


def release(plane: DataPlane, crt: ClusterRuntime, conn: UpstreamConn, reusable: bool) -> None:
    limits = crt.pool_limits
    max_requests = limits.max_requests_per_connection
    now = plane.now()
    if reusable and limits.max_connection_duration_s is not None and now - conn.created >= limits.max_connection_duration_s:
        reusable = False
    # bytes after the end of the response (a misbehaving upstream) must never become the next
    # request's response: such a connection is closed, not pooled
    if (reusable and not conn.closed and len(conn.buf) == conn.pos and not crt.tls_retired
            and (max_requests is None or conn.requests < max_requests)):
        conn.idle_since = now
        evicted = plane.pool(conn.pool_key, limits.idle_timeout_s).checkin(conn, now)
        if evicted is not None:
            discard(crt, evicted)
        if crt.pending:
            crt.waiters.unpark()
    else:
        discard(crt, conn)
