"""A Gateway's TCP servers (protocol TCP, MONGO, MYSQL, REDIS): each connection takes its listener's
VirtualService `tcp` route (a weighted pick of one destination cluster) to the TCP proxy.

The snapshot is read once per connection, when it is accepted. A listener without a route (no tcp
route applies to the server) closes each connection at once, as Envoy closes a connection that
finds no filter chain. The workload's AuthorizationPolicies (if any apply) decide each connection
first: a denied one is closed before any upstream connection.
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
from proxy.l4.tcp_proxy import DEFAULT_IDLE_TIMEOUT_S, TcpProxyStatsByCluster
from proxy.stats import HELP, Counter, Stats

HELP.setdefault("triomesh_gateway_tcp_cx_total",
                "Connections to Gateway TCP servers, by listener and what was done with them.")

log = structlog.get_logger("triomesh.l4")

NO_ROUTE = "no_route"
DENIED = "denied"  # an AuthorizationPolicy refused the connection


class GatewayTcpServer:
    """Serves one worker's Gateway TCP listeners. `plane` is the worker's DataPlane (snapshot,
    cluster runtimes, endpoint load)."""

    def __init__(self, plane, stats: Stats, connections: trio.Nursery, *,
                 idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S, rand_below=random.randrange) -> None:
        self.plane = plane
        self.stats = stats
        self.connections = connections
        self.idle_timeout_s = idle_timeout_s
        self.rand_below = rand_below  # uniform in [0, n): the weighted destination pick
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
            route = listener.tcp_route if listener is not None else None
            if route is None:
                self._count(listener_name, NO_ROUTE)
                sock.close()
                return
            try:
                client_ip = sock.getpeername()[0]
                local = sock.getsockname()[:2] if snapshot.authorization is not None else None
            except OSError:  # the client already left
                sock.close()
                return
            if snapshot.authorization is not None and not self._authorizer.allows(
                    snapshot.authorization, listener_name, client_ip, local):
                self._count(listener_name, DENIED)
                sock.close()
                return
            cluster = route.pick_cluster(self.rand_below)
            outcome = await proxy_to_cluster(self.plane, snapshot, cluster, sock, client_ip, None,
                                             stats=self._tcp_stats[cluster], idle_timeout_s=self.idle_timeout_s)
            self._count(listener_name, outcome.value)
        except Exception:  # one connection's bug must never cost the listener
            log.exception("gateway tcp handler failed", listener=listener_name)
            sock.close()
