"""One TCP connection's receive buffer and non-blocking send/recv, tried first and awaited only on EAGAIN.

Theory of operation
-------------------
Every await on a Trio socket method is a trip through the scheduler even when the kernel had the
data ready (~4 µs each, measured). So the plain stdlib socket is kept non-blocking, the
syscall is tried first, and only EAGAIN parks the task in `wait_readable`/`wait_writable`.
Deadlines are applied only on that slow path, so a request whose bytes are already there costs no
cancel scope. Callers checkpoint once per request (server.py) so a busy connection cannot starve
the others.

The receive buffer is an immutable `bytes` plus a read position: parsing and body forwarding work
on offsets into it (memoryviews, never copies), and a refill replaces it (joining only a leftover
tail, which is small or empty in the common case).

OS errors are returned as Python's own ConnectionError subclasses; the drivers translate them into
proxy errors where they know which side failed.
"""

from __future__ import annotations

import math
import socket
import struct
from time import monotonic
from typing import Callable

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable

from proxy.l7.reactor import Reactor
from proxy.l7.timeouts import TimeoutSweeper

RECV_BYTES = 64 * 1024
_INF = math.inf
_LINGER_RESET = struct.pack("ii", 1, 0)


class ReadTimeout(Exception):
    """No byte arrived before the deadline."""


class Conn:
    __slots__ = ("sock", "fd", "buf", "pos", "closed", "timed_out", "reactor", "sweeper", "idle_s", "io_deadline")
    # a fill that returned fewer than RECV_BYTES took everything the socket held (not so under TLS,
    # whose records may wait in its own buffers): the next wait may then skip the recv that says EAGAIN
    short_fill_empties_socket = True

    def __init__(self, sock: socket.socket, initial: bytes = b"", reactor: Reactor | None = None,
                 sweeper: TimeoutSweeper | None = None, idle_s: float = math.inf) -> None:
        """`initial`: bytes already read from the socket (a protocol sniffer's peek), replayed first.
        `reactor`: the worker's shared edge-triggered epoll (reactor.py); without one, Trio's own
        per-wait registration is used. `sweeper` + `idle_s`: no wait (read or write) may last longer
        than idle_s (Envoy's stream idle timeout), unless the owner set `io_deadline` itself (the
        server does, for its idle and header-read timeouts)."""
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = initial
        self.pos = 0
        self.closed = False
        self.timed_out = False  # set by the sweeper before it wakes us
        self.reactor = reactor
        self.sweeper = sweeper
        self.idle_s = idle_s
        self.io_deadline = math.inf  # time.monotonic() by which the current wait must end
        if reactor is not None:
            reactor.register(self.fd)
        if sweeper is not None:
            sweeper.watched.add(self)

    async def _wait(self, writable: bool) -> None:
        managed = self.io_deadline == math.inf and self.idle_s != math.inf
        if managed:
            self.io_deadline = monotonic() + self.idle_s
        try:
            if self.reactor is not None:
                if writable:
                    await self.reactor.wait_writable(self.fd)
                else:
                    await self.reactor.wait_readable(self.fd)
            elif writable:
                await wait_writable(self.sock)
            else:
                await wait_readable(self.sock)
        finally:
            if managed:
                self.io_deadline = math.inf

    async def _wait_readable(self) -> None:
        await self._wait(False)

    async def _wait_writable(self) -> None:
        if self.timed_out:
            raise ConnectionAbortedError("connection timed out")
        try:
            await self._wait(True)
        except trio.ClosedResourceError:
            raise ConnectionAbortedError("connection closed or timed out while waiting to write") from None

    @property
    def buffered(self) -> int:
        return len(self.buf) - self.pos

    async def fill(self, deadline: float = _INF, *, wait_first: bool = False) -> int:
        """Read more bytes onto the buffer; returns how many (0 at EOF). Raises ReadTimeout or
        ConnectionError (reset).

        `wait_first`: the caller expects nothing to be there yet (it just sent a request, or a
        response to a client that does not pipeline), so skip the recv that would say EAGAIN and
        park at once; waiting is also this request's checkpoint."""
        sock = self.sock
        while True:
            if not wait_first:
                try:
                    data = sock.recv(RECV_BYTES)
                    break
                except BlockingIOError:
                    pass
            wait_first = False
            if self.timed_out:
                raise ReadTimeout()
            try:
                if deadline == _INF:
                    # the common wait, _wait written out here: two coroutine frames fewer on a path
                    # every request takes twice (about 6k instructions per request, bench.instructions)
                    managed = self.io_deadline == _INF and self.idle_s != _INF
                    if managed:
                        self.io_deadline = monotonic() + self.idle_s
                    try:
                        if self.reactor is not None:
                            await self.reactor.wait_readable(self.fd)
                        else:
                            await wait_readable(sock)
                    finally:
                        if managed:
                            self.io_deadline = _INF
                else:
                    with trio.CancelScope(deadline=deadline) as scope:
                        await self._wait_readable()
                    if scope.cancelled_caught:
                        raise ReadTimeout()
            except trio.ClosedResourceError:
                if self.timed_out:
                    raise ReadTimeout() from None
                raise ConnectionAbortedError("connection closed while waiting to read") from None
        if not data:
            return 0
        if self.pos < len(self.buf):
            self.buf = self.buf[self.pos:] + data
        else:
            self.buf = data
        self.pos = 0
        return len(data)

    async def fill_parked(self, enough: Callable[[bytes, int], bool]) -> int:
        """`fill(wait_first=True)` for a peer that trickles (a slow request head): the bytes are read
        by the reactor's parked-queue task (reactor.py, "Parked reads") onto this buffer without
        waking this task, until `enough(buf, pos)` says they are worth a look or the peer ended.
        Returns how many bytes came meanwhile; less than RECV_BYTES means the socket was left empty.
        Woken with none (the peer's end or an error), it reads once itself, as fill() would."""
        if self.reactor is None or not self.short_fill_empties_socket:
            return await self.fill(wait_first=True)
        if self.timed_out:
            raise ReadTimeout()
        parked = _ParkedRead(self, enough)
        managed = self.io_deadline == _INF and self.idle_s != _INF
        if managed:
            self.io_deadline = monotonic() + self.idle_s
        try:
            await self.reactor.wait_parked(self.fd, parked)
        except trio.ClosedResourceError:
            if self.timed_out:
                raise ReadTimeout() from None
            raise ConnectionAbortedError("connection closed while waiting to read") from None
        finally:
            if managed:
                self.io_deadline = _INF
        if parked.added:
            return parked.added
        return await self.fill()

    def expire(self) -> None:
        """Wake a task waiting to read with ReadTimeout (from a sweeper task; the owner closes)."""
        if not self.closed:
            self.timed_out = True
            if self.reactor is not None:
                self.reactor.interrupt(self.fd)
            else:
                notify_closing(self.sock)

    def consume(self, n: int) -> memoryview:
        """Take the next n buffered bytes (n <= buffered) as a view."""
        start = self.pos
        self.pos = start + n
        return memoryview(self.buf)[start:start + n]

    def take_buffered(self) -> memoryview:
        return self.consume(len(self.buf) - self.pos)

    def peek_closed(self) -> bool:
        """For an idle pooled connection: has the peer closed or reset it, or sent stray bytes?"""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # EOF, or unsolicited bytes on an idle HTTP/1.1 connection: unusable either way

    def send_nowait(self, data: bytes | memoryview) -> memoryview | None:
        """Send what the kernel takes now; returns the unsent rest, or None when all of it went.
        Callers await `send_all(rest)` only for a rest, so a send that fits costs no coroutine."""
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            return memoryview(data)
        return None if n == len(data) else memoryview(data)[n:]

    async def send_all(self, data: bytes | memoryview) -> None:
        sock = self.sock
        while True:
            try:
                n = sock.send(data)
            except BlockingIOError:
                await self._wait_writable()
                continue
            if n == len(data):
                return
            data = memoryview(data)[n:]

    def send_many_nowait(self, parts: list) -> list | None:
        """Scatter/gather send of what the kernel takes now; returns the unsent parts, or None."""
        try:
            n = self.sock.sendmsg(parts)
        except BlockingIOError:
            return parts
        rest = _unsent(parts, n)
        return rest or None

    async def send_many(self, parts: list) -> None:
        """Scatter/gather send of several buffers in as few syscalls as the kernel allows."""
        sock = self.sock
        while parts:
            try:
                n = sock.sendmsg(parts)
            except BlockingIOError:
                await self._wait_writable()
                continue
            parts = _unsent(parts, n)

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.sweeper is not None:
                self.sweeper.watched.discard(self)
            if self.reactor is not None:
                self.reactor.forget(self.fd)  # before close: the fd number is reused at once
            notify_closing(self.sock)
            self.sock.close()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0): the peer sees a reset, never a clean end of a truncated message."""
        if not self.closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            self.close()


class _ParkedRead:
    """What the reactor's parked-queue task does for a parked `Conn.fill_parked`: one recv per
    readiness onto the connection's buffer, and the owner's `enough` check."""

    __slots__ = ("conn", "enough", "added")

    def __init__(self, conn: Conn, enough: Callable[[bytes, int], bool]) -> None:
        self.conn = conn
        self.enough = enough
        self.added = 0

    def read_parked(self) -> bool:
        conn = self.conn
        try:
            data = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return False  # a stale edge: the bytes were taken already
        except OSError:
            # a reset: the owner's own recv then reports the end. Its bytes so far stay buffered.
            return True
        if not data:
            return True
        if conn.pos < len(conn.buf):
            conn.buf = conn.buf[conn.pos:] + data
        else:
            conn.buf = data
        conn.pos = 0
        self.added += len(data)
        # a full recv may have left bytes in the socket, and no new edge would report them
        return len(data) == RECV_BYTES or self.enough(conn.buf, 0)


def _unsent(parts: list, n: int) -> list:
    """What is left of `parts` after the first n bytes went out (empty when all of it went)."""
    for i, part in enumerate(parts):
        size = len(part)
        if n < size:
            if n:
                return [memoryview(part)[n:], *parts[i + 1:]]
            return parts[i:]
        n -= size
    return []
