"""TCP with TLS on one side or both: the plaintext of a TLS connection copied to the other side and
back, with the TCP proxy's connect, stats, idle timeout and reset rules (proxy/l4/tcp_proxy.py).

Used when a Gateway `TLS` server terminates (SIMPLE or MUTUAL; TLS downstream, plain upstream) and
when a sidecar originates mesh mTLS to a TCP endpoint (plain or TLS downstream, TLS upstream). The
splice path of the plain TCP proxy cannot apply: the bytes must pass through OpenSSL.

Both sides are `Conn`s (a plain socket wrapped, or a `TlsConn`), so one pump serves every pairing.
Each direction is one task; EOF is passed on as the other side's half-close (close_notify + FIN on a
TLS side, FIN on a plain one), so a request-then-half-close protocol works as in plaintext. A third
task is the idle timer: no bytes either way for `idle_timeout_s` ends the connection, even while a
write is blocked on a peer that does not read.
"""

from __future__ import annotations

from functools import partial

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
    prepare_socket,
)
from proxy.l7.connio import Conn, ReadTimeout
from proxy.stats import Counter
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


async def _idle_timer(session: _Session) -> None:
    timeout_s = session.idle_timeout_s
    if timeout_s is None:
        return
    while True:
        await trio.sleep_until(session.last_activity + timeout_s)
        if trio.current_time() >= session.last_activity + timeout_s:
            session.fail(IdleTimeout(f"no bytes either way for {timeout_s}s"))
            return


async def _pump(source: Conn, sink: Conn, *, source_is_upstream: bool, session: _Session, counter: Counter,
                moved: list[int]) -> None:
    """Copy `source`'s bytes (its buffered ones first) to `sink` until EOF, then half-close `sink`."""
    while True:
        if not source.buffered:
            try:
                n = await source.fill()
            except ReadTimeout:  # the stream idle sweeper expired the connection
                raise IdleTimeout(f"no bytes from the {'upstream' if source_is_upstream else 'downstream'} "
                                  "within the stream idle timeout") from None
            except (TlsError, OSError) as exc:
                raise peer_gone(exc, upstream=source_is_upstream) from exc
            if n == 0:
                sink.shutdown_write()
                return
        view = source.take_buffered()
        try:
            await sink.send_all(view)
        except (TlsError, OSError) as exc:
            raise peer_gone(exc, upstream=not source_is_upstream) from exc
        moved[0] += len(view)
        counter.value += len(view)
        session.last_activity = trio.current_time()


async def _run(session: _Session, done: list[int], **pump) -> None:
    try:
        await _pump(session=session, **pump)
    except L4Error as exc:
        session.fail(exc)
    done[0] += 1
    if done[0] == 2 and session.scope is not None:  # both directions ended: stop the idle timer
        session.scope.cancel()


async def proxy_conns(downstream: Conn, upstream: Conn, *, stats: TcpProxyStats,
                      idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S) -> TcpProxyResult:
    """Proxy two connected `Conn`s (TLS handshakes done) until both directions end. Takes ownership
    of both: a reset seen on one side is passed on to the other."""
    prepare_socket(downstream.sock)  # TCP_NODELAY both ways, as the splice path: we forward, never coalesce
    prepare_socket(upstream.sock)
    result = TcpProxyResult(mode=CopyMode.COPY)
    started = trio.current_time()
    stats.downstream_cx_total.value += 1
    stats.downstream_cx_active.value += 1
    session = _Session(idle_timeout_s)
    up, down, done = [0], [0], [0]
    try:
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            nursery.start_soon(_idle_timer, session)
            nursery.start_soon(partial(_run, session, done, source=downstream, sink=upstream, source_is_upstream=False,
                                       counter=stats.bytes_downstream_to_upstream, moved=up))
            await _run(session, done, source=upstream, sink=downstream, source_is_upstream=True,
                       counter=stats.bytes_upstream_to_downstream, moved=down)
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
            downstream.reset()
        elif error is not None and error.source == "downstream":
            stats.downstream_reset_total.value += 1
            upstream.reset()
        downstream.close()
        upstream.close()
    return result


def count_connect_failure(stats: TcpProxyStats, error: ConnectFailure) -> None:
    """A connection that never reached its upstream, counted as the TCP proxy counts it."""
    stats.downstream_cx_total.value += 1
    stats.upstream_cx_connect_fail_total.value += 1
    if isinstance(error, ConnectTimeout):
        stats.upstream_cx_connect_timeout_total.value += 1
    elif isinstance(error, LocalConnectFailure):
        stats.local_fail(error.reason).value += 1


async def proxy_tls_to_upstream(conn: TlsConn, upstream_addr: UpstreamAddr, *, stats: TcpProxyStats,
                                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                                idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S) -> TcpProxyResult:
    """Connect to `upstream_addr` in plaintext and proxy the decrypted bytes of `conn` (handshake
    done) to it until both directions end. Takes ownership of `conn`."""
    try:
        upstream = await connect_upstream(upstream_addr, connect_timeout_s=connect_timeout_s)
    except ConnectFailure as exc:
        count_connect_failure(stats, exc)
        conn.close()
        return TcpProxyResult(mode=CopyMode.COPY, error=exc)
    except BaseException:
        conn.close()
        raise
    return await proxy_conns(conn, Conn(upstream), stats=stats, idle_timeout_s=idle_timeout_s)
