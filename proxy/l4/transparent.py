"""The capture listeners of a transparent sidecar (virtualOutbound :15001, virtualInbound :15006):
accept, read SO_ORIGINAL_DST, sniff when it matters, then hand the connection to the L7 pipeline
(a virtual listener) or the TCP proxy, as sidecar.py decides.

One task per connection, in the worker's connection nursery (so a reload that removes a listener
lets its connections finish). The snapshot is read once per connection, when it is accepted, and
the capture table derived from it is cached per snapshot. The proxy's own upstream connections are
not captured again because the proxy runs under the uid the capture rules exclude (see
`triomesh capture`, istio-iptables `-u`), or, for inbound passthrough, comes from 127.0.0.6.

Inbound security: PeerAuthentication's mode of the port decides whether the connection is mesh
mutual TLS, terminated here with the workload certificate (proxy/tls/mesh_inbound.py), or refused;
the workload's AuthorizationPolicies decide each inbound TCP connection before it is proxied (HTTP
connections are decided per request by the L7 chain, which sees the peer's SPIFFE ID).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

import structlog
import trio
from trio.lowlevel import wait_readable

from proxy.config.snapshot import Snapshot
from proxy.l4 import sidecar
from proxy.l4.accept import accept_connections
from proxy.l4.authorization import ConnectionAuthorizer
from proxy.l4.cluster_proxy import ConnectionLogLine, proxy_to_cluster, reset
from proxy.l4.connection_log import ConnectionClosed
from proxy.l4.original_dst import TransparentConnection, describe_connection
from proxy.l4.sniff import Protocol
from proxy.l4.sniff_stream import DEFAULT_SNIFF_TIMEOUT_S, sniff_socket
from proxy.l4.tcp_proxy import DEFAULT_IDLE_TIMEOUT_S, TcpProxyStatsByCluster, proxy_to_upstream
from proxy.l7.local_reply import local_reply_bytes
from proxy.tls import mesh_inbound
from proxy.telemetry.peer import UNKNOWN_WORKLOAD
from proxy.telemetry.peer_exchange import EMPTY_FRAME, PEER_EXCHANGE_ALPN, PeerExchangeError
from proxy.tls.conn import SPIFFE_PREFIX, TlsConn, TlsError
from proxy.tls.peer_exchange import exchange
from proxy.tls.tcp import proxy_tls_to_upstream
from proxy.stats import HELP, Counter, Stats

log = structlog.get_logger("triomesh.l4")

HELP.setdefault("triomesh_sidecar_cx_total", "Captured connections, by capture listener and what was done with them.")
HELP.setdefault("triomesh_sidecar_inbound_plaintext_refused_total",
                "Captured inbound plaintext connections closed because PeerAuthentication makes their port STRICT.")
HELP.setdefault(
    "triomesh_sidecar_outbound_refused_total",
    "Captured outbound connections to an unknown destination refused (REGISTRY_ONLY), by protocol.",
)

# after a refusal's 502, how long to read what the client still sends, so close() sends FIN, not RST
_REFUSE_DRAIN_S = 1.0
_REFUSE_DRAIN_MAX_BYTES = 256 * 1024


@dataclass(slots=True)
class CaptureSettings:
    sniff_timeout_s: float = DEFAULT_SNIFF_TIMEOUT_S
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S


class CaptureServer:
    """Serves the capture listeners of one worker. `plane` is the worker's L7 DataPlane."""

    def __init__(self, plane, stats: Stats, connections: trio.Nursery, settings: CaptureSettings | None = None) -> None:
        self.plane = plane
        self.stats = stats
        self.connections = connections
        self.settings = settings or CaptureSettings()
        # the last snapshot's derived state (a swap replaces it; connections keep what they read)
        self._snapshot: Snapshot | None = None
        self._table: sidecar.CaptureTable | None = None
        self._listeners: dict = {}
        self._tcp_stats = TcpProxyStatsByCluster(self.stats)
        self._counters: dict[tuple[str, str], Counter] = {}
        self._refused: dict[str, Counter] = {}
        self._plaintext_refused: dict[int, Counter] = {}
        self._authorizer = ConnectionAuthorizer(stats)
        self._mesh = mesh_inbound.MeshInbound(plane, stats, connections)

    # ---- per-snapshot state

    def table(self, snapshot: Snapshot) -> sidecar.CaptureTable:
        if snapshot is not self._snapshot:
            self._table = sidecar.capture_table(snapshot)
            self._listeners = {l.name: l for l in snapshot.listeners}
            self._snapshot = snapshot
        return self._table  # type: ignore[return-value]

    def _count(self, listener: str, action: str) -> None:
        c = self._counters.get((listener, action))
        if c is None:
            c = self._counters[(listener, action)] = self.stats.counter(
                "triomesh_sidecar_cx_total", listener=listener, action=action)
        c.value += 1

    # ---- accepting

    async def serve(self, sock, listener_name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on a capture listener's socket until cancelled (the ListenerManager's serve fn)."""

        def on_connection(csock: socket.socket) -> None:
            try:
                conn = describe_connection(csock)
            except OSError:  # the client already left
                csock.close()
                return
            self.connections.start_soon(self._handle, listener_name, conn)

        await accept_connections(sock, listener_name, on_connection, stats=self.stats, task_status=task_status)

    async def _handle(self, listener_name: str, conn: TransparentConnection) -> None:
        handed_off = False
        try:
            handed_off = await self.handle(listener_name, conn)
        except Exception:  # one connection's bug must never cost the listener
            log.exception("capture handler failed", listener=listener_name, client=str(conn.client),
                          orig_dst=str(conn.orig_dst))
        finally:
            if not handed_off:
                conn.sock.close()

    async def handle(self, listener_name: str, conn: TransparentConnection) -> bool:
        """Decide and serve one connection. Returns whether its socket was handed to a driver that
        closes it (the TCP proxy or the L7 server)."""
        snapshot = self.plane.holder.current
        table = self.table(snapshot)
        listener = self._listeners.get(listener_name)
        if listener is None:
            return False
        if not conn.redirected:
            # dialled the capture port itself: forwarding to our own address would loop
            self._count(listener_name, "not_redirected")
            return False
        inbound = listener.traffic_direction == "INBOUND"
        needs_sniff = (sidecar.inbound_needs_sniff if inbound else sidecar.outbound_needs_sniff)(table, conn.orig_dst)
        # PeerAuthentication on this inbound port: STRICT takes only mesh mTLS, PERMISSIVE terminates
        # a ClientHello offering istio ALPN (proxy/tls/mesh_inbound.py); the first bytes decide
        mode = snapshot.mtls.mode_for(conn.orig_dst.port) if inbound else "DISABLE"
        identity = self._mesh.identity() if mode != "DISABLE" else None
        protocol, sni, alpn, initial = None, None, (), b""
        if needs_sniff or mesh_inbound.needs_first_bytes(mode, identity is not None):
            detection, initial = await sniff_socket(conn.sock, timeout_s=self.settings.sniff_timeout_s)
            protocol, sni, alpn = detection.protocol, detection.sni, detection.alpn
        tls: TlsConn | None = None
        if mode != "DISABLE":
            action = mesh_inbound.decide(mode, protocol, alpn, identity is not None)
            if action is mesh_inbound.Action.REFUSE:
                self._refuse_plaintext(listener_name, conn, protocol, mode)
                return False
            if action is mesh_inbound.Action.TERMINATE:
                tls = await self._mesh.terminate(conn.sock, initial, conn.orig_dst.port, str(conn.client))
                if tls is None:
                    self._count(listener_name, "mtls_handshake_failed")
                    return True  # closed with the TLS connection
                protocol, initial = mesh_inbound.inner_protocol(tls.alpn_protocol), b""
            else:
                self._mesh.count(conn.orig_dst.port, "plaintext" if protocol is not Protocol.TLS else "tls_passthrough")
        peer_principal = tls.peer_principal() if tls is not None else None
        if inbound:
            decision = sidecar.decide_inbound(table, conn.orig_dst, protocol)
        else:
            decision = sidecar.decide_outbound(table, conn.orig_dst, protocol, sni)
        if (inbound and snapshot.authorization is not None and not isinstance(decision, sidecar.L7)
                and not self._authorizer.allows(snapshot.authorization, listener_name, conn.client.ip,
                                                conn.orig_dst.sockaddr(), peer_principal=peer_principal, sni=sni)):
            self._count(listener_name, "denied")  # HTTP is decided per request by the L7 chain instead
            if tls is not None:
                tls.close()
                return True
            return False
        if tls is not None:
            return await self._serve_terminated(listener_name, conn, snapshot, decision, tls, peer_principal)
        if isinstance(decision, sidecar.L7):
            self._count(listener_name, "http")
            from proxy.l7.server import serve_connection

            await serve_connection(self.plane, decision.listener, conn.sock, conn.client.sockaddr(), initial,
                                   nursery=self.connections, original_destination=conn.orig_dst.sockaddr())
            return True
        if isinstance(decision, sidecar.Refuse):
            await self._refuse(listener_name, conn, protocol, decision)
            return True
        if isinstance(decision, sidecar.Tcp):
            outcome = await proxy_to_cluster(self.plane, snapshot, decision.cluster, conn.sock, conn.client.ip,
                                             conn.orig_dst.sockaddr(), stats=self._tcp_stats[decision.cluster],
                                             idle_timeout_s=self.settings.idle_timeout_s, initial=initial,
                                             inbound=inbound)
            self._count(listener_name, outcome.value)
            return True
        # Passthrough: to the original destination as it is (an IP address)
        self._count(listener_name, "tcp")
        line = ConnectionLogLine.open(self.plane, snapshot, conn.sock, conn.orig_dst.sockaddr(), inbound=inbound)
        result = await proxy_to_upstream(
            conn.sock,
            decision.upstream,
            connect_timeout_s=self.plane.settings.connect_timeout_s,
            idle_timeout_s=self.settings.idle_timeout_s,
            downstream_prefix=initial,
            stats=self._tcp_stats[decision.cluster],
            bind_ip=decision.bind_ip,
        )
        if line is not None:
            line.emit(decision.cluster, ConnectionClosed("", str(decision.upstream), result))
        if result.error is not None and result.error.source == "upstream":
            log.info("tcp upstream failed", listener=listener_name, orig_dst=str(conn.orig_dst),
                     upstream=str(decision.upstream), flag=result.error.response_flag, error=str(result.error))
        return True

    async def _serve_terminated(self, listener_name: str, conn: TransparentConnection, snapshot: Snapshot,
                                decision, tls: TlsConn, peer_principal: str | None) -> bool:
        """The plaintext inside an inbound mesh mTLS connection: HTTP to the L7 chain with the peer's
        identity, anything else to the TCP proxy (the TLS copy pump)."""
        if isinstance(decision, sidecar.L7):
            self._count(listener_name, "http")
            from proxy.l7.server import DownstreamConnection

            downstream = DownstreamConnection(self.plane, decision.listener, conn.sock, conn.client.sockaddr(),
                                              original_destination=conn.orig_dst.sockaddr(),
                                              peer_principal=peer_principal, conn=tls)
            downstream.peer.sni = tls.server_name  # connection.sni for authorization
            await downstream.run()
            return True
        # the client's facts (TCP peer exchange, when it offered it), and its principal
        peer = UNKNOWN_WORKLOAD
        if tls.alpn_protocol == PEER_EXCHANGE_ALPN:
            telemetry = self.plane.telemetry
            try:
                peer = await exchange(tls, telemetry.peer_frame if telemetry is not None else EMPTY_FRAME) or peer
            except (PeerExchangeError, TlsError, OSError) as e:
                self._count(listener_name, "peer_exchange_failed")
                log.info("inbound peer exchange failed", client=str(conn.client), orig_dst=str(conn.orig_dst),
                         error=str(e))
                tls.reset()
                return True
        if peer_principal is not None:
            peer = replace(peer, principal=SPIFFE_PREFIX + peer_principal)
        if isinstance(decision, sidecar.Tcp):
            outcome = await proxy_to_cluster(self.plane, snapshot, decision.cluster, tls, conn.client.ip,
                                             conn.orig_dst.sockaddr(), stats=self._tcp_stats[decision.cluster],
                                             idle_timeout_s=self.settings.idle_timeout_s, inbound=True,
                                             peer_identity=peer)
            self._count(listener_name, outcome.value)
            return True
        if isinstance(decision, sidecar.Passthrough):
            self._count(listener_name, "tcp")
            line = ConnectionLogLine.open(self.plane, snapshot, tls, conn.orig_dst.sockaddr(), inbound=True)
            result = await proxy_tls_to_upstream(tls, decision.upstream, stats=self._tcp_stats[decision.cluster],
                                                 connect_timeout_s=self.plane.settings.connect_timeout_s,
                                                 idle_timeout_s=self.settings.idle_timeout_s)
            if line is not None:
                line.emit(decision.cluster, ConnectionClosed("", str(decision.upstream), result))
            return True
        tls.close()
        return True

    def _refuse_plaintext(self, listener_name: str, conn: TransparentConnection, protocol: Protocol | None,
                          mode: str) -> None:
        """A STRICT port and a connection that is not mesh mTLS (or no workload certificate yet):
        closed unanswered (Istio's sidecar finds no filter chain for plaintext on a STRICT port)."""
        self._count(listener_name, "mtls_refused")
        self._mesh.refuse(conn.orig_dst.port, str(conn.client), protocol, mode)
        c = self._plaintext_refused.get(conn.orig_dst.port)
        if c is None:
            c = self._plaintext_refused[conn.orig_dst.port] = self.stats.counter(
                "triomesh_sidecar_inbound_plaintext_refused_total", port=str(conn.orig_dst.port))
        c.value += 1

    async def _refuse(self, listener_name: str, conn: TransparentConnection, protocol: Protocol | None,
                      decision: sidecar.Refuse) -> None:
        """BlackHoleCluster: HTTP/1 gets a 502 (Istio's block_all route), anything else a reset."""
        kind = "http" if protocol is Protocol.HTTP1 else "tcp"
        c = self._refused.get(kind)
        if c is None:
            c = self._refused[kind] = self.stats.counter("triomesh_sidecar_outbound_refused_total", protocol=kind)
        c.value += 1
        self._count(listener_name, "refused")
        log.info("outbound refused", client=str(conn.client), orig_dst=str(conn.orig_dst), protocol=kind,
                 reason=decision.reason)
        sock = conn.sock
        if kind == "tcp":
            reset(sock)
            return
        self.plane.count_downstream(502, ["NR"])
        try:
            await _send_all(sock, local_reply_bytes(502, b"upstream not in the mesh registry\n", close=True))
            sock.shutdown(socket.SHUT_WR)
            await _drain(sock)
        except OSError:
            pass
        finally:
            sock.close()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    with trio.fail_after(5):
        while view:
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def _drain(sock: socket.socket) -> None:
    """Read and drop what the client still sends until it closes (bounded in bytes and time)."""
    left = _REFUSE_DRAIN_MAX_BYTES
    with trio.move_on_after(_REFUSE_DRAIN_S):
        while left > 0:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                await wait_readable(sock)
                continue
            if not data:
                return
            left -= len(data)
