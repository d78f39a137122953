"""TCP after TLS termination (a Gateway `TLS` server in mode SIMPLE or MUTUAL): the plaintext of a
downstream TLS connection to a plain upstream socket and back, with the TCP proxy's connect,
stats, idle timeout and reset rules (proxy/l4/tcp_proxy.py).

The splice path of the plain TCP proxy cannot apply: the bytes must pass through OpenSSL. Each
direction is one task; EOF is passed on as the other side's half-close (close_notify + FIN towards
the client, FIN towards the upstream), so a request-then-half-close protocol works as in plaintext.
"""

from __future__ import annotations

import socket

import trio

from proxy.l4.addrs import UpstreamAddr
from proxy.l4.errors import ConnectFailure, ConnectTimeout, IdleTimeout, L4Error, LocalConnectFailure, peer_gone
from proxy.l4.tcp_proxy import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    CopyMode,
    TcpProxyResult,
    TcpProxyStats,
    connect_upstream,
)
from proxy.l7.connio import RECV_BYTES, ReadTimeout
from proxy.tls.conn import TlsConn, TlsError


class _Session:
    __slots__ = ("last_activity", "idle_timeout_s", "error", "scope")

    def __init__(self, idle_timeout_s: float | None) -> None:
        self.last_activity = trio.current_time()
        self.idle_timeout_s = idle_timeout_s
        self.error: L4Error | None = None
        self.scope: trio.CancelScope | None = None

    def fail(self, error: L4Error) -> None:
        if self.error is None:
            self.error = error
        if self.scope is not None:
            self.scope.cancel()

    def deadline(self) -> float:
        return trio.current_time() + 3600.0 if self.idle_timeout_s is None else self.last_activity + self.idle_timeout_s

    def idle(self) -> bool:
        return self.idle_timeout_s is not None and trio.current_time() >= self.last_activity + self.idle_timeout_s


async def _downstream_to_upstream(conn: TlsConn, upstream: socket.socket, session: _Session,
                                  stats: TcpProxyStats, moved: list[int]) -> None:
    while True:
        try:
            n = await conn.fill(session.deadline())
        except ReadTimeout:
            if session.idle():
                raise IdleTimeout(f"no bytes either way for {session.idle_timeout_s}s") from None
            continue
        except (TlsError, OSError) as exc:
            raise peer_gone(exc, upstream=False) from exc
        if n == 0:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        view = conn.take_buffered()
        while view:
            try:
                sent = upstream.send(view)
            except BlockingIOError:
                with trio.move_on_at(session.deadline()):
                    await trio.lowlevel.wait_writable(upstream)
                if session.idle():
                    raise IdleTimeout(f"no bytes either way for {session.idle_timeout_s}s") from None
                continue
            except OSError as exc:
                raise peer_gone(exc, upstream=True) from exc
            view = view[sent:]
            moved[0] += sent
            stats.bytes_downstream_to_upstream.value += sent
            session.last_activity = trio.current_time()


async def _upstream_to_downstream(conn: TlsConn, upstream: socket.socket, session: _Session,
                                  stats: TcpProxyStats, moved: list[int]) -> None:
    while True:
        try:
            data = upstream.recv(RECV_BYTES)
        except BlockingIOError:
            with trio.move_on_at(session.deadline()):
                await trio.lowlevel.wait_readable(upstream)
            if session.idle():
                raise IdleTimeout(f"no bytes either way for {session.idle_timeout_s}s") from None
            continue
        except OSError as exc:
            raise peer_gone(exc, upstream=True) from exc
        if not data:
            conn.shutdown_write()
            return
        try:
            await conn.send_all(data)
        except (TlsError, OSError) as exc:
            raise peer_gone(exc, upstream=False) from exc
        moved[0] += len(data)
        stats.bytes_upstream_to_downstream.value += len(data)
        session.last_activity = trio.current_time()


async def _run(pump, conn: TlsConn, upstream: socket.socket, session: _Session, stats: TcpProxyStats,
               moved: list[int]) -> None:
    try:
        await pump(conn, upstream, session, stats, moved)
    except L4Error as exc:
        session.fail(exc)


async def proxy_tls_to_upstream(conn: TlsConn, upstream_addr: UpstreamAddr, *, stats: TcpProxyStats,
                                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                                idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S) -> TcpProxyResult:
    """Connect to `upstream_addr` and proxy the decrypted bytes of `conn` (handshake done) to it
    until both directions end. Takes ownership of `conn`."""
    try:
        upstream = await connect_upstream(upstream_addr, connect_timeout_s=connect_timeout_s)
    except ConnectFailure as exc:
        stats.downstream_cx_total.value += 1
        stats.upstream_cx_connect_fail_total.value += 1
        if isinstance(exc, ConnectTimeout):
            stats.upstream_cx_connect_timeout_total.value += 1
        elif isinstance(exc, LocalConnectFailure):
            stats.local_fail(exc.reason).value += 1
        conn.close()
        return TcpProxyResult(mode=CopyMode.COPY, error=exc)
    except BaseException:
        conn.close()
        raise
    result = TcpProxyResult(mode=CopyMode.COPY)
    started = trio.current_time()
    stats.downstream_cx_total.value += 1
    stats.downstream_cx_active.value += 1
    session = _Session(idle_timeout_s)
    up, down = [0], [0]
    try:
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            nursery.start_soon(_run, _downstream_to_upstream, conn, upstream, session, stats, up)
            await _run(_upstream_to_downstream, conn, upstream, session, stats, down)
        result.error = session.error
    finally:
        result.bytes_downstream_to_upstream, result.bytes_upstream_to_downstream = up[0], down[0]
        result.duration_s = trio.current_time() - started
        stats.downstream_cx_active.value -= 1
        error = result.error
        if isinstance(error, IdleTimeout):
            stats.idle_timeout_total.value += 1
        elif error is not None and error.source == "upstream":
            stats.upstream_reset_total.value += 1
            conn.reset()
        elif error is not None and error.source == "downstream":
            stats.downstream_reset_total.value += 1
        conn.close()
        upstream.close()
    return result
