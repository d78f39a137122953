"""A Gateway's TCP servers (protocol TCP, MONGO, MYSQL, REDIS): each connection takes its listener's
VirtualService `tcp` route (a weighted pick of one destination cluster) to the TCP proxy. And its TLS
PASSTHROUGH servers: the ClientHello's SNI picks the first VirtualService `tls` route that takes it;
the bytes read to see it are replayed to the upstream, the TLS session is the client's and the
upstream's own. And its terminating TLS servers (mode SIMPLE or MUTUAL): the handshake picks a server
by SNI (proxy/tls/listener.py), whose own tcp route takes the decrypted bytes.

The snapshot is read once per connection, when it is accepted. A listener without a route (no tcp
route applies to the server) closes each connection at once, as Envoy closes a connection that
finds no filter chain. The workload's AuthorizationPolicies (if any apply) decide each connection
that has a route, before any upstream connection (a denied one is closed): on PASSTHROUGH servers with
the ClientHello's SNI as `connection.sni`, on terminating ones after the handshake, with the SNI and
a MUTUAL server's verified client identity as `source.principal`.
"""

from __future__ import annotations

import random
import socket

import structlog
import trio

from proxy.config.snapshot import Listener, Snapshot
from proxy.l4.accept import accept_connections
from proxy.l4.authorization import ConnectionAuthorizer
from proxy.l4.cluster_proxy import proxy_to_cluster
from proxy.l4.sniff import Protocol
from proxy.l4.sniff_stream import sniff_socket
from proxy.l4.tcp_proxy import DEFAULT_IDLE_TIMEOUT_S, TcpProxyStatsByCluster
from proxy.stats import HELP, Counter, Stats
from proxy.tls.conn import TlsConn, TlsError
from proxy.tls.listener import TlsListeners

HELP.setdefault("triomesh_gateway_tcp_cx_total",
                "Connections to Gateway TCP servers, by listener and what was done with them.")

log = structlog.get_logger("triomesh.l4")

NO_ROUTE = "no_route"
DENIED = "denied"  # an AuthorizationPolicy refused the connection
NOT_TLS = "not_tls"  # a PASSTHROUGH server got something other than a TLS ClientHello
# how long a PASSTHROUGH server waits for the whole ClientHello (Envoy's listener_filters_timeout)
CLIENT_HELLO_TIMEOUT_S = 15.0


class GatewayTcpServer:
    """Serves one worker's Gateway TCP listeners. `plane` is the worker's DataPlane (snapshot,
    cluster runtimes, endpoint load)."""

    def __init__(self, plane, stats: Stats, connections: trio.Nursery, *,
                 idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S, rand_below=random.randrange,
                 tls_listeners: TlsListeners | None = None) -> None:
        """`tls_listeners`: the worker's TLS runtimes (terminating TLS servers need them)."""
        self.plane = plane
        self.stats = stats
        self.connections = connections
        self.idle_timeout_s = idle_timeout_s
        self.rand_below = rand_below  # uniform in [0, n): the weighted destination pick
        self.tls_listeners = tls_listeners if tls_listeners is not None else TlsListeners(stats)
        self._snapshot: Snapshot | None = None
        self._listeners: dict[str, Listener] = {}
        self._tcp_stats = TcpProxyStatsByCluster(self.stats)
        self._counters: dict[tuple[str, str], Counter] = {}
        self._authorizer = ConnectionAuthorizer(stats)

    async def serve(self, sock, listener_name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on a Gateway TCP listener's socket until cancelled (the ListenerManager's serve fn)."""

        def on_connection(csock: socket.socket) -> None:
            self.connections.start_soon(self._handle, listener_name, csock)

        await accept_connections(sock, listener_name, on_connection, stats=self.stats, task_status=task_status)

    def _listener(self, snapshot: Snapshot, name: str) -> Listener | None:
        if snapshot is not self._snapshot:
            self._listeners = {l.name: l for l in snapshot.listeners}
            self._snapshot = snapshot
        return self._listeners.get(name)

    def _count(self, listener: str, action: str) -> None:
        c = self._counters.get((listener, action))
        if c is None:
            c = self._counters[(listener, action)] = self.stats.counter(
                "triomesh_gateway_tcp_cx_total", listener=listener, action=action)
        c.value += 1

    async def _handle(self, listener_name: str, sock: socket.socket) -> None:
        try:
            snapshot = self.plane.holder.current
            listener = self._listener(snapshot, listener_name)
            if listener is not None and listener.protocol == "TLS":
                if listener.tls_servers:
                    await self._terminate(listener, snapshot, sock)
                else:
                    await self._passthrough(listener, snapshot, sock)
                return
            route = listener.tcp_route if listener is not None else None
            if route is None:
                self._count(listener_name, NO_ROUTE)
                sock.close()
                return
            try:
                client_ip = sock.getpeername()[0]
            except OSError:  # the client already left
                sock.close()
                return
            if not self._authorized(snapshot, listener_name, sock, client_ip):
                sock.close()
                return
            cluster = route.pick_cluster(self.rand_below)
            outcome = await proxy_to_cluster(self.plane, snapshot, cluster, sock, client_ip, None,
                                             stats=self._tcp_stats[cluster], idle_timeout_s=self.idle_timeout_s)
            self._count(listener_name, outcome.value)
        except Exception:  # one connection's bug must never cost the listener
            log.exception("gateway tcp handler failed", listener=listener_name)
            sock.close()

    def _authorized(self, snapshot: Snapshot, listener_name: str, sock: socket.socket, client_ip: str,
                    principal: str | None = None, sni: str | None = None) -> bool:
        """The workload's AuthorizationPolicies (when any apply) on this connection; a denial is
        counted (and logged by the authorizer)."""
        if snapshot.authorization is None:
            return True
        try:
            local = sock.getsockname()[:2]
        except OSError:  # the client already left
            return False
        if self._authorizer.allows(snapshot.authorization, listener_name, client_ip, local, principal, sni):
            return True
        self._count(listener_name, DENIED)
        return False

    async def _passthrough(self, listener: Listener, snapshot: Snapshot, sock: socket.socket) -> None:
        """A TLS PASSTHROUGH connection: read the ClientHello, route by its SNI, replay it upstream."""
        detection, initial = await sniff_socket(sock, timeout_s=CLIENT_HELLO_TIMEOUT_S)
        if detection.protocol is not Protocol.TLS:
            self._count(listener.name, NOT_TLS)
            sock.close()
            return
        try:
            client_ip, port = sock.getpeername()[:2]
        except OSError:
            sock.close()
            return
        route = next((r for r in listener.tls_routes if r.matches_connection(detection.sni, client_ip, port)), None)
        if route is None:
            self._count(listener.name, NO_ROUTE)
            log.info("no tls route for the connection's SNI", listener=listener.name, sni=detection.sni)
            sock.close()
            return
        # the TLS session is not ours: the SNI, never a principal
        if not self._authorized(snapshot, listener.name, sock, client_ip, sni=detection.sni):
            sock.close()
            return
        cluster = route.pick_cluster(self.rand_below)
        outcome = await proxy_to_cluster(self.plane, snapshot, cluster, sock, client_ip, None,
                                         stats=self._tcp_stats[cluster], idle_timeout_s=self.idle_timeout_s,
                                         initial=initial)
        self._count(listener.name, outcome.value)

    async def _terminate(self, listener: Listener, snapshot: Snapshot, sock: socket.socket) -> None:
        """A terminating TLS server: handshake (server by SNI), then its tcp route over the plaintext."""
        runtime = self.tls_listeners.for_listener(snapshot, listener.name)
        if runtime is None:
            sock.close()
            return
        context, client_hello, timeout_s = await runtime.starting_context(sock)
        if context is None:
            runtime.count_error("no_certificate")
            sock.close()
            return
        conn = TlsConn(sock, context, server_side=True, initial=client_hello)
        try:
            await conn.handshake(timeout_s)
            client_ip = sock.getpeername()[0]
        except (TlsError, OSError) as e:
            runtime.count_error(runtime.failure_reason(conn, e))
            conn.close()
            return
        runtime.count_handshake(conn)
        server_listener = self._listener(snapshot, runtime.server_for(conn).listener)
        route = server_listener.tcp_route if server_listener is not None else None
        if route is None:
            self._count(listener.name, NO_ROUTE)
            conn.close()
            return
        # a MUTUAL server's verified client certificate is the principal
        if not self._authorized(snapshot, listener.name, sock, client_ip, conn.peer_principal(), conn.server_name):
            conn.close()
            return
        cluster = route.pick_cluster(self.rand_below)
        outcome = await proxy_to_cluster(self.plane, snapshot, cluster, conn, client_ip, None,
                                         stats=self._tcp_stats[cluster], idle_timeout_s=self.idle_timeout_s)
        self._count(listener.name, outcome.value)
