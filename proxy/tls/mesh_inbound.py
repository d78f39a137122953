"""Inbound mesh mutual TLS on a sidecar: what PeerAuthentication's mode makes of a connection's first
bytes (`decide`, pure), and the termination with the workload certificate (`MeshInbound`).

STRICT: TLS is terminated (a client certificate signed by the trust bundle is required, so non-mesh
TLS fails its handshake); plaintext is closed. PERMISSIVE: a ClientHello offering an `istio*` ALPN
is terminated; other TLS goes to the app untouched; plaintext is served as plaintext. DISABLE: as it
comes. Without a workload certificate yet, STRICT refuses everything and PERMISSIVE takes nothing
as mesh mTLS.
"""

from __future__ import annotations

import enum
import socket

import structlog

from proxy.l4.sniff import Protocol
from proxy.stats import HELP, Counter, Stats
from proxy.tls.conn import TlsConn, TlsError
from proxy.tls.listener import HANDSHAKE_TIMEOUT_S
from proxy.tls.mesh import ISTIO_H2, ISTIO_HTTP1, MeshContexts, offers_mesh_alpn

log = structlog.get_logger("triomesh.mtls")

HELP.setdefault("triomesh_sidecar_inbound_mtls_total",
                "Inbound connections by what PeerAuthentication made of them (terminated mesh mTLS, plaintext, "
                "refused), by port.")
HELP.setdefault("triomesh_sidecar_inbound_mtls_session_reused_total",
                "Inbound mesh mTLS handshakes that resumed a session (a ticket the client kept), by port.")
HELP.setdefault("triomesh_sidecar_inbound_mtls_handshake_fail_total",
                "Inbound mesh mTLS handshakes that failed, by reason (fail_verify_no_cert: a client without a mesh "
                "certificate).")


class Action(enum.Enum):
    TERMINATE = "mtls"  # mesh mTLS with the workload certificate
    AS_IS = "as_is"  # plaintext, or TLS passed to the app untouched
    REFUSE = "refused"


def needs_first_bytes(mode: str, has_identity: bool) -> bool:
    """Whether the connection's first bytes must be read before deciding."""
    return mode == "STRICT" or (mode == "PERMISSIVE" and has_identity)


def decide(mode: str, protocol: Protocol | None, alpn: tuple[str, ...], has_identity: bool) -> Action:
    if mode == "STRICT":
        return Action.TERMINATE if protocol is Protocol.TLS and has_identity else Action.REFUSE
    if mode == "PERMISSIVE" and has_identity and protocol is Protocol.TLS and offers_mesh_alpn(alpn):
        return Action.TERMINATE
    return Action.AS_IS


def inner_protocol(alpn: str | None) -> Protocol:
    """What runs inside the terminated connection, from the negotiated ALPN."""
    if alpn in (ISTIO_H2, "h2"):
        return Protocol.HTTP2
    if alpn in (ISTIO_HTTP1, "http/1.1"):
        return Protocol.HTTP1
    return Protocol.OPAQUE


class MeshInbound:
    """One worker's inbound mTLS: contexts of its current identity, counters per port and outcome."""

    def __init__(self, plane, stats: Stats, connections=None) -> None:
        self.plane = plane
        self.connections = connections  # the nursery the reactor and sweeper run in (the capture's)
        self.stats = stats
        self.contexts = MeshContexts(session_tickets=plane.session_tickets)
        self._counters: dict[tuple[int, str], Counter] = {}

    def identity(self):
        holder = getattr(self.plane, "workload_identity", None)
        return holder.current if holder is not None else None

    def count(self, port: int, outcome: str) -> None:
        c = self._counters.get((port, outcome))
        if c is None:
            c = self._counters[(port, outcome)] = self.stats.counter(
                "triomesh_sidecar_inbound_mtls_total", port=str(port), outcome=outcome)
        c.value += 1

    def refuse(self, port: int, client: str, protocol: Protocol | None, mode: str) -> None:
        self.count(port, Action.REFUSE.value)
        log.info("inbound connection refused by PeerAuthentication", mode=mode, port=port, client=client,
                 protocol=protocol.value if protocol is not None else "unknown",
                 reason="no workload certificate yet" if protocol is Protocol.TLS else "not mutual TLS")

    async def terminate(self, sock: socket.socket, initial: bytes, port: int, client: str, *,
                        nodelay: bool = True) -> TlsConn | None:
        """The handshake with the workload certificate; None (socket closed, counted) when it fails.
        `nodelay=False`: the caller sets TCP_NODELAY itself before its first write (the L7 server
        does for every connection; the server's handshake is one flight, which Nagle never holds)."""
        plane = self.plane
        if self.connections is not None:  # a capture listener starts them here; serve_listener did already
            plane.sweeper.ensure_running(self.connections)
            plane.reactor.ensure_running(self.connections)
        if nodelay:  # no Nagle delay between the handshake's flights and the TCP peer exchange's frames
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = TlsConn(sock, self.contexts.server(self.identity()), server_side=True, initial=initial,
                       reactor=plane.reactor, sweeper=plane.sweeper, idle_s=plane.settings.stream_idle_timeout_s)
        try:
            await conn.handshake(HANDSHAKE_TIMEOUT_S)
        except (TlsError, OSError) as e:
            reason = getattr(e, "reason", "connection_error")
            self.stats.counter("triomesh_sidecar_inbound_mtls_handshake_fail_total", port=str(port),
                               reason=reason).value += 1
            log.info("inbound mesh mTLS handshake failed", port=port, client=client, reason=reason, error=str(e))
            conn.close()
            return None
        except BaseException:
            conn.close()
            raise
        self.count(port, Action.TERMINATE.value)
        if conn.session_reused:
            self.stats.counter("triomesh_sidecar_inbound_mtls_session_reused_total", port=str(port)).value += 1
        return conn


def inbound_listener_handler(mesh: MeshInbound, listener_name: str, port: int):
    """The connection handler of a bound Sidecar ingress listener (captureMode NONE): the same
    decision as the inbound capture, on the listener's port, then the L7 server."""
    from proxy.l4.sniff_stream import sniff_socket
    from proxy.l7.server import DownstreamConnection

    plane = mesh.plane

    async def handle(sock: socket.socket, addr) -> None:
        mode = plane.holder.current.mtls.mode_for(port)
        identity = mesh.identity() if mode != "DISABLE" else None
        if not needs_first_bytes(mode, identity is not None):
            await DownstreamConnection(plane, listener_name, sock, addr).run()
            return
        detection, initial = await sniff_socket(sock)
        action = decide(mode, detection.protocol, detection.alpn, identity is not None)
        if action is Action.REFUSE or (action is Action.AS_IS and detection.protocol is Protocol.TLS):
            # an HTTP listener cannot pass the app's own TLS through: closed like a STRICT refusal
            mesh.refuse(port, f"{addr[0]}:{addr[1]}", detection.protocol, mode)
            sock.close()
            return
        if action is Action.AS_IS:
            mesh.count(port, "plaintext")
            await DownstreamConnection(plane, listener_name, sock, addr, initial).run()
            return
        # DownstreamConnection.run sets TCP_NODELAY: one setsockopt per connection, not two
        conn = await mesh.terminate(sock, initial, port, f"{addr[0]}:{addr[1]}", nodelay=False)
        if conn is None:
            return
        downstream = DownstreamConnection(plane, listener_name, sock, addr, peer_principal=conn.peer_principal(),
                                          conn=conn)
        downstream.peer.sni = conn.server_name  # connection.sni for authorization
        await downstream.run()

    return handle
