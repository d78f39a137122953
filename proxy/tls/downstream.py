"""A connection accepted on an HTTPS listener: the TLS handshake (server chosen by SNI), then the
HTTP/1.1 server over the TLS connection, on the chosen server's routes (ALPN `h2`: the client opens
with the HTTP/2 preface, which the HTTP/1.1 server hands to the HTTP/2 codec as for h2c).

A failed handshake is counted by reason and the connection closed; nothing reaches the routes.
"""

from __future__ import annotations

import socket

import structlog
import trio

from proxy.l7.dataplane import DataPlane
from proxy.l7.server import DownstreamConnection, serve_listener
from proxy.tls.conn import TlsConn, TlsError
from proxy.tls.listener import TlsListeners

log = structlog.get_logger("triomesh.tls")


async def serve_tls_connection(plane: DataPlane, tls_listeners: TlsListeners, listener_name: str,
                               sock: socket.socket, addr) -> None:
    """Handshake, then serve HTTP on the virtual listener of the server the handshake chose."""
    runtime = tls_listeners.for_listener(plane.holder.current, listener_name)
    if runtime is None:
        sock.close()  # the listener left the config while this connection waited in the backlog
        return
    # a connection in its handshake (and in reading the ClientHello before it) counts against
    # --max-downstream-connections like a served one (DownstreamConnection counts it from then on)
    plane.downstream_cx_active.value += 1
    try:
        conn = await _handshake(plane, runtime, listener_name, sock)
    finally:
        plane.downstream_cx_active.value -= 1
    if conn is None:
        return
    try:
        runtime.count_handshake(conn)
        server = runtime.server_for(conn)
        downstream = DownstreamConnection(plane, server.listener, sock, addr, peer_principal=conn.peer_principal(),
                                          conn=conn)
    except Exception:  # a bug must cost one connection, never the worker
        log.exception("unexpected error after a tls handshake", listener=listener_name)
        conn.reset()
        return
    downstream.peer.sni = conn.server_name  # connection.sni for authorization
    await downstream.run()


async def _handshake(plane: DataPlane, runtime, listener_name: str, sock: socket.socket) -> TlsConn | None:
    """The connection once its handshake completed; None when it failed (counted, socket closed)."""
    try:
        context, client_hello, timeout_s = await runtime.starting_context(sock)
    except BaseException:
        sock.close()
        raise
    if context is None:
        runtime.count_error("no_certificate")
        sock.close()
        return None
    conn = TlsConn(sock, context, server_side=True, initial=client_hello, reactor=plane.reactor,
                   sweeper=plane.sweeper, idle_s=plane.settings.stream_idle_timeout_s)
    try:
        await conn.handshake(timeout_s)
    except TlsError as e:
        reason = runtime.failure_reason(conn, e)
        runtime.count_error(reason)
        log.debug("tls handshake failed", listener=listener_name, reason=reason, sni=conn.server_name, error=str(e))
        conn.close()
        return None
    except OSError as e:
        runtime.count_error("connection_error")
        log.debug("tls handshake failed", listener=listener_name, reason="connection_error", error=str(e))
        conn.close()
        return None
    except Exception:  # a bug must cost one connection, never the listener
        log.exception("unexpected error during a tls handshake", listener=listener_name)
        conn.reset()
        return None
    except BaseException:  # cancelled: the worker stops
        conn.close()
        raise
    return conn


def https_serve_function(plane: DataPlane, tls_listeners: TlsListeners, connection_nursery):
    """The ListenerManager serve function of HTTPS listeners: the L7 accept loop, each connection
    handshaking first."""

    async def serve(sock, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async def handle(csock: socket.socket, addr) -> None:
            await serve_tls_connection(plane, tls_listeners, name, csock, addr)

        await serve_listener(sock, name, plane, connection_nursery=connection_nursery, handle_connection=handle,
                             task_status=task_status)

    return serve
