"""Proxy bytes between a downstream and an upstream TCP socket until both directions finish.

Theory of operation
-------------------
Each direction is one Trio task ("pump") moving bytes from a source socket to a destination
socket. Sockets are plain non-blocking stdlib sockets; a pump always tries the syscall first and
only parks in `trio.lowlevel.wait_readable/wait_writable` when the kernel says EAGAIN, because
every await on a Trio socket method costs a scheduler trip even when the call would have succeeded
(about 4 µs each, measured). It checkpoints once per `_ROUNDS_PER_CHECKPOINT` busy rounds so a bulk transfer
cannot starve the other tasks.

Two ways to move bytes:

* SPLICE (default on Linux): socket -> pipe -> socket with `os.splice`, one pipe pair per
  direction. The payload never enters user space; this matched Envoy's CPU per byte.
* COPY: `recv_into` a fixed per-direction buffer, `send` it on. For kernels/sockets without
  splice, and selectable for benchmarks.

Pipe accounting: we track how many bytes sit in the pipe. EAGAIN when filling it is ambiguous
(source empty *or* pipe slots full), so a pump only waits for the source to become readable when
the pipe is empty; with bytes in the pipe it drains first, and waits for the destination to become
writable if that blocks. That rule never spins and never deadlocks.

Half-close: EOF from the source (recv/splice returns 0) -> once everything read has been written,
`shutdown(SHUT_WR)` on the destination; the other direction keeps running (RFC 9293 §3.6 lets a
half-closed connection keep receiving). The proxy ends when both directions reached EOF, or on the
first error, or when no byte moved either way for `idle_timeout_s` (checked by whichever pump is
waiting, against a timestamp both pumps update, so idleness needs no task of its own).

Errors are translated where they happen into proxy/l4/errors.py types and recorded on the result
(not raised: a reset is an ordinary end for a TCP proxy, and the access log wants the byte counts
either way). A reset on one side is passed on as a reset (SO_LINGER 0) to the other, so a client
never mistakes a broken upstream for a complete response.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

import trio

from proxy.l4.addrs import UpstreamAddr
from proxy.l4.errors import (
    ConnectFailure,
    ConnectTimeout,
    DownstreamReset,
    IdleTimeout,
    L4Error,
    LocalConnectFailure,
    UpstreamReset,
    peer_gone,
)
from proxy.exhaustion import exhaustion_reason
from proxy.stats import HELP, Counter, Gauge, Stats

SPLICE_AVAILABLE = hasattr(os, "splice")
_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)) if SPLICE_AVAILABLE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Linux's default pipe capacity (16 pages). A bigger pipe means fewer splice calls per byte (the
# bench measured ~1/3 less proxy CPU per GiB at 256 KiB), but pipe capacity is charged to the
# user's pipe-user-pages-soft budget (64 MiB by default) whether used or not, so a connection
# starts with the default and grows its pipe only once it has proved to be a bulk transfer.
DEFAULT_PIPE_BYTES = 64 * 1024
DEFAULT_BULK_PIPE_BYTES = 256 * 1024
_BULK_AFTER_BYTES = 1024 * 1024
# The COPY path's per-direction buffer: small, because it is resident for the connection's life.
DEFAULT_COPY_BUFFER_BYTES = 64 * 1024
# Envoy's defaults: cluster connect_timeout 10 s (Istio's too), tcp_proxy idle_timeout 1 h.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 3600.0
_ROUNDS_PER_CHECKPOINT = 16
# errnos meaning "this fd cannot be spliced": fall back to copying
_NO_SPLICE_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class CopyMode(enum.Enum):
    SPLICE = "splice"
    COPY = "copy"


def default_mode() -> CopyMode:
    return CopyMode.SPLICE if SPLICE_AVAILABLE else CopyMode.COPY


HELP.setdefault("triomesh_tcp_downstream_cx_total", "TCP proxy connections handled, by cluster.")
HELP.setdefault("triomesh_tcp_downstream_cx_active", "TCP proxy connections open now, by cluster.")
HELP.setdefault("triomesh_tcp_bytes_total", "Bytes proxied at L4, by cluster and direction.")
HELP.setdefault("triomesh_tcp_upstream_cx_connect_fail_total", "L4 upstream connects that failed, by cluster.")
HELP.setdefault("triomesh_tcp_upstream_cx_connect_timeout_total", "L4 upstream connects that timed out, by cluster.")
HELP.setdefault("triomesh_tcp_idle_timeout_total", "TCP proxy connections closed for idleness, by cluster.")
HELP.setdefault("triomesh_tcp_cx_reset_total", "TCP proxy connections ended by a reset, by cluster and side.")


class TcpProxyStats:
    """The metric objects of one cluster's TCP proxying, looked up once (not per connection)."""

    __slots__ = (
        "downstream_cx_total",
        "downstream_cx_active",
        "bytes_downstream_to_upstream",
        "bytes_upstream_to_downstream",
        "upstream_cx_connect_fail_total",
        "upstream_cx_connect_timeout_total",
        "idle_timeout_total",
        "downstream_reset_total",
        "upstream_reset_total",
        "_stats",
    )

    def __init__(self, stats: Stats, cluster: str) -> None:
        self.downstream_cx_total: Counter = stats.counter("triomesh_tcp_downstream_cx_total", cluster=cluster)
        self.downstream_cx_active: Gauge = stats.gauge("triomesh_tcp_downstream_cx_active", cluster=cluster)
        self.bytes_downstream_to_upstream: Counter = stats.counter(
            "triomesh_tcp_bytes_total", cluster=cluster, direction="downstream_to_upstream"
        )
        self.bytes_upstream_to_downstream: Counter = stats.counter(
            "triomesh_tcp_bytes_total", cluster=cluster, direction="upstream_to_downstream"
        )
        self.upstream_cx_connect_fail_total: Counter = stats.counter(
            "triomesh_tcp_upstream_cx_connect_fail_total", cluster=cluster
        )
        self.upstream_cx_connect_timeout_total: Counter = stats.counter(
            "triomesh_tcp_upstream_cx_connect_timeout_total", cluster=cluster
        )
        self.idle_timeout_total: Counter = stats.counter("triomesh_tcp_idle_timeout_total", cluster=cluster)
        self.downstream_reset_total: Counter = stats.counter("triomesh_tcp_cx_reset_total", cluster=cluster, side="downstream")
        self.upstream_reset_total: Counter = stats.counter("triomesh_tcp_cx_reset_total", cluster=cluster, side="upstream")
        self._stats = stats

    def local_fail(self, reason: str) -> Counter:
        """Upstream connects that failed on our side (the L7 counter of the same name), looked up
        only when it happens."""
        return self._stats.counter("triomesh_upstream_cx_local_fail_total", reason=reason)


class TcpProxyStatsByCluster(dict):
    """TcpProxyStats per cluster name, made on first use: what every TCP route's connections count in."""

    def __init__(self, stats) -> None:
        super().__init__()
        self.stats = stats

    def __missing__(self, cluster: str) -> TcpProxyStats:
        made = self[cluster] = TcpProxyStats(self.stats, cluster)
        return made


@dataclass(slots=True)
class TcpProxyResult:
    """What one proxied connection did; `error` is None when both directions ended with EOF."""

    bytes_downstream_to_upstream: int = 0  # Envoy: upstream_cx_tx_bytes_total
    bytes_upstream_to_downstream: int = 0  # Envoy: upstream_cx_rx_bytes_total
    duration_s: float = 0.0
    mode: CopyMode = CopyMode.SPLICE
    error: L4Error | None = None


# --- connecting -----------------------------------------------------------------------------------


def prepare_socket(sock: socket.socket) -> socket.socket:
    """Non-blocking + TCP_NODELAY (Envoy sets nodelay on both sides: we forward, never coalesce)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def connect_upstream(
    addr: UpstreamAddr, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, bind_ip: str | None = None
) -> socket.socket:
    """A connected non-blocking socket to `addr`, or ConnectFailure / ConnectTimeout.

    `bind_ip` picks the source address (Envoy's upstream_bind_config), e.g. 127.0.0.6 for inbound
    passthrough so the capture rules let the connection reach the app instead of capturing it again.
    """
    try:
        sock = socket.socket(addr.family, socket.SOCK_STREAM)
    except OSError as exc:
        reason = exhaustion_reason(exc.errno)
        if reason is None:
            raise ConnectFailure(f"connect to {addr}: {exc.strerror or exc}") from exc
        raise LocalConnectFailure(f"connect to {addr}: {exc.strerror or exc}", reason) from exc
    try:
        prepare_socket(sock)
        if bind_ip is not None:
            try:
                sock.bind((bind_ip, 0))
            except OSError as exc:
                raise ConnectFailure(f"cannot bind source {bind_ip}: {exc.strerror}") from exc
        err = sock.connect_ex(addr.sockaddr())
        if err == errno.EINPROGRESS:
            with trio.move_on_after(connect_timeout_s) as waited:
                await trio.lowlevel.wait_writable(sock)
            if waited.cancelled_caught:
                raise ConnectTimeout(f"connect to {addr} timed out after {connect_timeout_s}s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if err:
            reason = exhaustion_reason(err)
            if reason is not None:  # ENOBUFS, no ephemeral port left: ours, not the upstream's
                raise LocalConnectFailure(f"connect to {addr}: {os.strerror(err)}", reason)
            raise ConnectFailure(f"connect to {addr}: {os.strerror(err)}")
        return sock
    except BaseException:
        sock.close()
        raise


# --- proxying -------------------------------------------------------------------------------------


class _Session:
    """State the two pumps share. The first to fail cancels the other."""

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

    async def park(self, wait, sock: socket.socket) -> None:  # noqa: ANN001
        """Wait for `sock` to become readable/writable, or fail the session once no byte moved in
        either direction for idle_timeout_s. Each pump checks idleness only while it waits, so
        there is no watchdog task to spawn and cancel per connection (that cost ~60 us)."""
        idle_timeout_s = self.idle_timeout_s
        if idle_timeout_s is None:
            await wait(sock)
            return
        while True:
            with trio.move_on_at(self.last_activity + idle_timeout_s):
                await wait(sock)
                return
            # the deadline passed; the other direction may have moved bytes meanwhile
            if trio.current_time() >= self.last_activity + idle_timeout_s:
                raise IdleTimeout(f"no bytes either way for {idle_timeout_s}s")


class _Direction:
    __slots__ = ("src", "dst", "src_is_upstream", "counter", "moved")

    def __init__(self, src: socket.socket, dst: socket.socket, *, src_is_upstream: bool, counter: Counter) -> None:
        self.src = src
        self.dst = dst
        self.src_is_upstream = src_is_upstream
        self.counter = counter
        self.moved = 0

    def read_error(self, exc: OSError) -> L4Error:
        return peer_gone(exc, upstream=self.src_is_upstream)

    def write_error(self, exc: OSError) -> L4Error:
        return peer_gone(exc, upstream=not self.src_is_upstream)

    def finish(self) -> None:
        """Source hit EOF and everything was written: pass the FIN on."""
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # destination already gone; its own direction will report it


async def proxy_sockets(
    downstream: socket.socket,
    upstream: socket.socket,
    *,
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    mode: CopyMode | None = None,
    downstream_prefix: bytes = b"",
    stats: TcpProxyStats | None = None,
    pipe_bytes: int = DEFAULT_PIPE_BYTES,
    bulk_pipe_bytes: int = DEFAULT_BULK_PIPE_BYTES,
    copy_buffer_bytes: int = DEFAULT_COPY_BUFFER_BYTES,
) -> TcpProxyResult:
    """Proxy until both directions reach EOF, an error, or idleness. Takes ownership: both sockets
    are closed on return (with a reset passed on if one side reset).

    `downstream_prefix` is bytes already read from downstream (sniffing) to send upstream first.
    """
    mode = mode or default_mode()
    if mode is CopyMode.SPLICE and not SPLICE_AVAILABLE:
        mode = CopyMode.COPY
    prepare_socket(downstream)
    prepare_socket(upstream)
    if stats is None:
        stats = _UNCOUNTED
    result = TcpProxyResult(mode=mode)
    started = trio.current_time()
    stats.downstream_cx_total.value += 1
    stats.downstream_cx_active.value += 1
    up = _Direction(downstream, upstream, src_is_upstream=False, counter=stats.bytes_downstream_to_upstream)
    down = _Direction(upstream, downstream, src_is_upstream=True, counter=stats.bytes_upstream_to_downstream)
    if mode is CopyMode.SPLICE:
        pump, size, grow_to = _pump_splice, pipe_bytes, max(bulk_pipe_bytes, pipe_bytes)
    else:
        pump, size, grow_to = _pump_copy, copy_buffer_bytes, copy_buffer_bytes
    session = _Session(idle_timeout_s)
    try:
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            nursery.start_soon(_run_pump, pump, up, session, size, grow_to, downstream_prefix)
            await _run_pump(pump, down, session, size, grow_to, b"")  # this task is the second pump: one spawn less
        result.error = session.error
    finally:
        result.bytes_downstream_to_upstream = up.moved
        result.bytes_upstream_to_downstream = down.moved
        result.duration_s = trio.current_time() - started
        stats.downstream_cx_active.value -= 1
        _count_error(stats, result.error)
        _close_pair(downstream, upstream, result.error)
    return result


async def proxy_to_upstream(
    downstream: socket.socket,
    upstream_addr: UpstreamAddr,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    mode: CopyMode | None = None,
    downstream_prefix: bytes = b"",
    stats: TcpProxyStats | None = None,
    pipe_bytes: int = DEFAULT_PIPE_BYTES,
    bulk_pipe_bytes: int = DEFAULT_BULK_PIPE_BYTES,
    copy_buffer_bytes: int = DEFAULT_COPY_BUFFER_BYTES,
    bind_ip: str | None = None,
) -> TcpProxyResult:
    """Connect to `upstream_addr` and proxy `downstream` to it (Envoy's tcp_proxy filter for one
    connection). Takes ownership of `downstream`. A failed connect is reported in `result.error`
    and the downstream is closed."""
    try:
        upstream = await connect_upstream(upstream_addr, connect_timeout_s=connect_timeout_s, bind_ip=bind_ip)
    except ConnectFailure as exc:
        counted = stats or _UNCOUNTED
        counted.downstream_cx_total.value += 1
        counted.upstream_cx_connect_fail_total.value += 1
        if isinstance(exc, ConnectTimeout):
            counted.upstream_cx_connect_timeout_total.value += 1
        elif isinstance(exc, LocalConnectFailure):
            counted.local_fail(exc.reason).value += 1
        downstream.close()
        return TcpProxyResult(mode=mode or default_mode(), error=exc)
    except BaseException:
        downstream.close()
        raise
    return await proxy_sockets(
        downstream,
        upstream,
        idle_timeout_s=idle_timeout_s,
        mode=mode,
        downstream_prefix=downstream_prefix,
        stats=stats,
        pipe_bytes=pipe_bytes,
        bulk_pipe_bytes=bulk_pipe_bytes,
        copy_buffer_bytes=copy_buffer_bytes,
    )


async def _run_pump(pump, direction: _Direction, session: _Session, size: int, grow_to: int, prefix: bytes) -> None:  # noqa: ANN001
    try:
        if prefix:
            await _send_all(direction, prefix, session)
        await pump(direction, session, size, grow_to)
    except L4Error as exc:
        session.fail(exc)


async def _send_all(d: _Direction, data: bytes, session: _Session) -> None:
    view = memoryview(data)
    while view:
        try:
            n = d.dst.send(view)
        except BlockingIOError:
            await session.park(trio.lowlevel.wait_writable, d.dst)
            continue
        except OSError as exc:
            raise d.write_error(exc) from exc
        view = view[n:]
        d.moved += n
        d.counter.value += n
        session.last_activity = trio.current_time()


def _resize_pipe(fd: int, wanted_bytes: int, current_bytes: int) -> int:
    """The pipe's capacity after trying to set it (refused over pipe-max-size or the user's budget)."""
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, wanted_bytes)
    except OSError:
        return current_bytes


async def _pump_splice(d: _Direction, session: _Session, pipe_bytes: int, bulk_pipe_bytes: int) -> None:
    try:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # out of fds (EMFILE/ENFILE): this connection still works without a pipe
        return await _pump_copy(d, session, DEFAULT_COPY_BUFFER_BYTES, 0)
    try:
        if pipe_bytes != DEFAULT_PIPE_BYTES:
            pipe_bytes = _resize_pipe(write_fd, pipe_bytes, DEFAULT_PIPE_BYTES)
        grow_at = _BULK_AFTER_BYTES if bulk_pipe_bytes > pipe_bytes else -1
        src_fd, dst_fd = d.src.fileno(), d.dst.fileno()
        splice = os.splice
        in_pipe = 0
        eof = False
        busy_rounds = 0
        while True:
            moved = False
            if not eof and in_pipe < pipe_bytes:
                try:
                    n = splice(src_fd, write_fd, pipe_bytes - in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass  # source empty, or pipe slots full: decided below by in_pipe
                except OSError as exc:
                    if exc.errno in _NO_SPLICE_ERRNOS and in_pipe == 0 and d.moved == 0:
                        return await _pump_copy(d, session, DEFAULT_COPY_BUFFER_BYTES, 0)
                    raise d.read_error(exc) from exc
                else:
                    if n:
                        in_pipe += n
                        moved = True
                    else:
                        eof = True
            write_blocked = False
            if in_pipe:
                try:
                    n = splice(read_fd, dst_fd, in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    write_blocked = True
                except OSError as exc:
                    raise d.write_error(exc) from exc
                else:
                    in_pipe -= n
                    d.moved += n
                    d.counter.value += n
                    moved = True
                    if d.moved > grow_at >= 0:  # a bulk transfer: worth a bigger pipe, once
                        pipe_bytes = _resize_pipe(write_fd, bulk_pipe_bytes, pipe_bytes)
                        grow_at = -1
            if eof and not in_pipe:
                d.finish()
                return
            if moved:
                session.last_activity = trio.current_time()
                busy_rounds += 1
                if busy_rounds >= _ROUNDS_PER_CHECKPOINT:
                    busy_rounds = 0
                    await trio.lowlevel.checkpoint()
                continue
            busy_rounds = 0
            if in_pipe and write_blocked:
                await session.park(trio.lowlevel.wait_writable, d.dst)
            else:
                await session.park(trio.lowlevel.wait_readable, d.src)
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def _pump_copy(d: _Direction, session: _Session, buffer_bytes: int, _grow_to: int) -> None:
    buf = memoryview(bytearray(buffer_bytes))
    src, dst = d.src, d.dst
    start = end = 0  # buf[start:end] is read but not yet written
    eof = False
    busy_rounds = 0
    while True:
        moved = False
        if not eof and end == 0:
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise d.read_error(exc) from exc
            else:
                if n:
                    end = n
                    moved = True
                else:
                    eof = True
        write_blocked = False
        if start < end:
            try:
                n = dst.send(buf[start:end])
            except BlockingIOError:
                write_blocked = True
            except OSError as exc:
                raise d.write_error(exc) from exc
            else:
                start += n
                d.moved += n
                d.counter.value += n
                moved = True
                if start == end:
                    start = end = 0
        if eof and start == end:
            d.finish()
            return
        if moved:
            session.last_activity = trio.current_time()
            busy_rounds += 1
            if busy_rounds >= _ROUNDS_PER_CHECKPOINT:
                busy_rounds = 0
                await trio.lowlevel.checkpoint()
            continue
        busy_rounds = 0
        if write_blocked:
            await session.park(trio.lowlevel.wait_writable, dst)
        else:
            await session.park(trio.lowlevel.wait_readable, src)


# --- ending ---------------------------------------------------------------------------------------

_LINGER_RESET = struct.pack("ii", 1, 0)


def _close_pair(downstream: socket.socket, upstream: socket.socket, error: L4Error | None) -> None:
    if isinstance(error, (UpstreamReset, DownstreamReset)):
        # pass the reset on to the side that did not reset: SO_LINGER 0 makes close() send RST
        survivor = downstream if isinstance(error, UpstreamReset) else upstream
        try:
            survivor.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    downstream.close()
    upstream.close()


def _count_error(stats: TcpProxyStats, error: L4Error | None) -> None:
    if error is None:
        return
    if isinstance(error, IdleTimeout):
        stats.idle_timeout_total.value += 1
    elif isinstance(error, UpstreamReset):
        stats.upstream_reset_total.value += 1
    elif isinstance(error, DownstreamReset):
        stats.downstream_reset_total.value += 1


_UNCOUNTED = TcpProxyStats(Stats(), "")
