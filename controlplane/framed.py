"""Trio driver for the wire protocol: send and receive whole messages on one TCP connection.

Theory of operation: the control plane holds thousands of mostly idle streams, and a push is one small
frame to each. An await on a Trio stream is a trip through the scheduler even when the kernel takes
the bytes at once (about 4 µs measured on this design's target machine), so the driver keeps the plain socket non-blocking and tries the
syscall first: a frame that fits in the socket buffer is sent without a scheduler trip, and only a
partial send or EAGAIN parks the task in `wait_writable` (holding the send lock, so frames never
interleave). A send's timeout is armed on that slow path only (a cancel scope per frame costs more
than the send). Receiving likewise tries `recv` first and waits for readability only on EAGAIN, except
after a short read of a plain socket: that read emptied the socket, so the stream waits first (a proxy
stream gets one small frame at a time, and a recv failing with EAGAIN per frame is a syscall and an
exception per ACK). Callers that loop over many streams without waiting checkpoint themselves now and
then.

Over TLS (controlplane/tls.py) the socket is a non-blocking `ssl.SSLSocket`: its WantWrite/WantRead
errors are this driver's EAGAIN. OpenSSL writes a send whole or asks for the same bytes again, which
is what the retry loop does. The rare write that wants a read first (or a read that wants a write)
cannot wait on the socket, which the receiving (sending) task may be waiting on already; it sleeps
a moment and tries again.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable

from controlplane.wire import MAX_FRAME_BYTES, Error, FrameDecoder, Message, ProtocolError, encode_frame

RECEIVE_BYTES = 65536
ERROR_SEND_TIMEOUT_S = 1.0
CHECKPOINT_EVERY = 16  # receives served without waiting before yielding to other tasks
CROSSED_WANT_SLEEP_S = 0.005  # a TLS write waiting for a read (or the reverse): try again this soon
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError)


class StreamClosed(Exception):
    """The peer closed the stream or it broke."""


class SendTimeout(StreamClosed):
    """A send waited for buffer space longer than its timeout (the stream is closed if the frame was
    cut)."""


def plain_socket(stream: trio.SocketStream | socket.socket) -> socket.socket:
    if isinstance(stream, socket.socket):
        return stream
    # take the file descriptor over from Trio's wrapper (which is left detached and harmless to close)
    return socket.socket(fileno=stream.socket.detach())


class FramedStream:
    """One end of a protocol stream. Several tasks may send (frames never interleave); one task receives."""

    def __init__(self, stream: trio.SocketStream | socket.socket, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.sock = plain_socket(stream)
        self.sock.setblocking(False)
        self._send_lock = trio.Lock()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: list[Message] = []
        self._ready_pos = 0
        self._unyielded = 0
        self._drained = False
        self._plain = not isinstance(self.sock, ssl.SSLSocket)
        self.closed = False
        self.on_close: Callable[[], None] | None = None  # told before the socket closes (controlplane/receiver.py)
        self.read_wants_write = False  # the last receive_nowait stopped on a TLS read that must write first
        self.bytes_sent = 0  # also how the control plane's keepalive sees that something was sent
        self.bytes_received = 0

    @property
    def sending(self) -> bool:
        """A send is parked waiting for buffer space."""
        return self._send_lock.locked()

    async def send(self, message: Message, *, timeout_s: float | None = None) -> None:
        await self.send_frame(encode_frame(message), timeout_s=timeout_s)

    async def send_frame(self, frame: bytes, *, timeout_s: float | None = None) -> None:
        """Send an encoded frame. Returns without a scheduler trip when the kernel takes it whole.
        `timeout_s` bounds only a send that has to wait for buffer space (the timer is armed on that
        slow path alone: a cancel scope per frame would cost more than the send). When it expires,
        SendTimeout is raised; if part of the frame went out (or a TLS write was begun, which OpenSSL
        must finish with the same bytes) nothing more can follow it, and the stream is closed first."""
        if self.closed:
            raise StreamClosed("stream is closed")
        if not self._send_lock.locked():
            try:
                n = self.sock.send(frame)
            except _WOULD_BLOCK:
                n = 0
            except OSError as e:
                raise StreamClosed(str(e)) from e
            if n == len(frame):  # the common case: no lock, no timer, no scheduler trip
                self.bytes_sent += n
                return
            started = [n > 0 or not self._plain]  # a send of this frame was begun
            self._send_lock.acquire_nowait()
            try:
                with _deadline(timeout_s) as scope:
                    await self._send_rest(memoryview(frame)[n:], started)
            finally:
                self._send_lock.release()
        else:
            started = [False]
            with _deadline(timeout_s) as scope:
                async with self._send_lock:  # queue behind the parked send
                    await self._send_rest(memoryview(frame), started)
        if scope.cancelled_caught:
            if started[0]:
                await self.aclose()
                raise SendTimeout(f"a send waited more than {timeout_s}s for the peer to read; the frame was cut, "
                                  "so the stream was closed")
            raise SendTimeout(f"a send waited more than {timeout_s}s for the peer to read; nothing of it was sent")
        self.bytes_sent += len(frame)

    async def _send_rest(self, view: memoryview, started: list[bool]) -> None:
        whole = len(view)
        while view:
            if self.closed:
                raise StreamClosed("stream is closed")
            want_read = False
            try:
                n = self.sock.send(view)
            except ssl.SSLWantReadError:
                n, want_read = 0, True
            except _WOULD_BLOCK:
                n = 0
            except OSError as e:
                raise StreamClosed(str(e)) from e
            view = view[n:]
            if len(view) < whole or not self._plain:
                started[0] = True
            if view:
                if want_read:
                    await trio.sleep(CROSSED_WANT_SLEEP_S)
                    continue
                try:
                    await wait_writable(self.sock)
                except trio.ClosedResourceError:
                    raise StreamClosed("stream closed while sending") from None

    async def send_bytes(self, data: bytes) -> None:
        """Raw bytes, not a frame (for tests of broken peers)."""
        await self.send_frame(data)

    async def receive(self) -> Message:
        """The next message. Raises StreamClosed at end of stream, ProtocolError on a bad frame (after
        telling the peer with an Error message and closing the stream)."""
        while self._ready_pos >= len(self._ready):
            self._ready.clear()
            self._ready_pos = 0
            if self.closed:
                raise StreamClosed("stream is closed")
            if self._drained:
                # the last read emptied the socket: a recv now would mostly fail with EAGAIN (an
                # exception and a syscall per message on a stream that gets one small frame at a time)
                self._drained = False
                self._unyielded = 0
                try:
                    await wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise StreamClosed("stream closed while receiving") from None
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except ssl.SSLWantWriteError:
                await trio.sleep(CROSSED_WANT_SLEEP_S)
                continue
            except (BlockingIOError, ssl.SSLWantReadError):
                self._unyielded = 0
                try:
                    await wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise StreamClosed("stream closed while receiving") from None
                continue
            except OSError as e:
                raise StreamClosed(str(e)) from e
            if not data:
                raise StreamClosed("end of stream")
            self._unyielded += 1
            if self._unyielded >= CHECKPOINT_EVERY:  # a peer that keeps us busy must not starve the rest
                self._unyielded = 0
                await checkpoint()
            self.bytes_received += len(data)
            # a short read of a plain socket took everything the kernel held; TLS may hold decrypted
            # bytes back (a record at a time), so only the plain socket can skip the next attempt
            self._drained = self._plain and len(data) < RECEIVE_BYTES
            try:
                self._ready.extend(self._decoder.feed(data))
            except ProtocolError as e:
                await self.fail(e)
                raise
        message = self._ready[self._ready_pos]
        self._ready_pos += 1
        return message

    def receive_nowait(self) -> list[Message]:
        """Every message to be had without waiting: those already decoded, then whatever the socket
        holds now. Raises StreamClosed at the end of the stream (once the messages before it are
        returned) and ProtocolError on a bad frame; the caller tells the peer (`fail`). After a TLS
        read that must write first, `read_wants_write` is set: try again shortly (the socket may not
        become readable again)."""
        messages = self._ready[self._ready_pos :]
        self._ready.clear()
        self._ready_pos = 0
        self.read_wants_write = False
        while not self.closed:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                self.read_wants_write = True
                break
            except OSError as e:
                raise StreamClosed(str(e)) from e
            if not data:
                if messages:
                    break  # the end shows again on the next call
                raise StreamClosed("end of stream")
            self.bytes_received += len(data)
            messages.extend(self._decoder.feed(data))
            if self._plain and len(data) < RECEIVE_BYTES:
                break  # a short read of a plain socket took everything the kernel held (TLS may hold more)
        if self.closed and not messages:
            raise StreamClosed("stream is closed")
        return messages

    async def fail(self, error: ProtocolError) -> None:
        """Best effort: tell the peer why, then close."""
        if not self.closed:
            with trio.move_on_after(ERROR_SEND_TIMEOUT_S):
                try:
                    await self.send(Error(code=error.code, message=error.message))
                except (StreamClosed, ProtocolError):
                    pass
        await self.aclose()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()
            notify_closing(self.sock)  # wakes a task parked in wait_readable/wait_writable
            self.sock.close()
        await trio.lowlevel.cancel_shielded_checkpoint()


def _deadline(timeout_s: float | None) -> trio.CancelScope:
    return trio.CancelScope() if timeout_s is None else trio.move_on_after(timeout_s)


async def connect(host: str, port: int, *, max_frame_bytes: int = MAX_FRAME_BYTES,
                  tls: ssl.SSLContext | None = None) -> FramedStream:
    """A stream to the control plane: plain TCP, or TLS verified with `tls` (controlplane/tls.py)."""
    if tls is not None:
        from controlplane import tls as control_tls

        return FramedStream(await control_tls.connect(host, port, tls), max_frame_bytes=max_frame_bytes)
    stream = await trio.open_tcp_stream(host, port)
    return FramedStream(stream, max_frame_bytes=max_frame_bytes)
