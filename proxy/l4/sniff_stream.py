"""Trio driver for sniff.py: read a connection's first bytes with a deadline, then replay them.

The bytes read to decide are not lost: `sniff_socket` returns them so the TCP proxy sends them
upstream first, and `PrefixedStream` hands them out again ahead of the live stream to whatever
HTTP/TLS handler takes the connection. Server-first protocols (SMTP, MySQL, SSH...) send nothing
until the server speaks, so silence for `timeout_s` means OPAQUE, like Istio's listener
inspectors.
"""

from __future__ import annotations

import socket

import trio

from proxy.l4 import sniff
from proxy.l4.sniff import NEED_MORE, Detection

# Envoy's tls/http inspectors wait for the client's first bytes; for a server-first protocol nothing
# ever comes, so the wait must be short and its expiry means "opaque" (Istio's protocol sniffing
# timeout defaults to 100 ms).
DEFAULT_SNIFF_TIMEOUT_S = 0.1
_READ_CHUNK_BYTES = 4096


async def sniff_socket(
    sock: socket.socket, *, timeout_s: float = DEFAULT_SNIFF_TIMEOUT_S, max_bytes: int = sniff.MAX_SNIFF_BYTES
) -> tuple[Detection, bytes]:
    """Read from a non-blocking stdlib socket until sniff.detect decides or `timeout_s` passes.

    Returns the detection and every byte consumed (to be replayed). Tries recv first and only waits
    when the kernel has nothing, so a client that already sent its request costs one syscall.
    """
    buf = bytearray()
    deadline = trio.current_time() + timeout_s
    at_eof = False
    for _ in range(max_bytes // 16 + 2):  # bounded: each round adds bytes or ends
        try:
            chunk = sock.recv(min(_READ_CHUNK_BYTES, max_bytes - len(buf)))
        except BlockingIOError:
            with trio.move_on_at(deadline) as waited:
                await trio.lowlevel.wait_readable(sock)
            if waited.cancelled_caught:
                at_eof = True
            else:
                continue
        except (ConnectionError, OSError):
            at_eof = True  # a reset while sniffing: decide on what we have, the proxy will see it too
        else:
            if not chunk:
                at_eof = True
            buf += chunk
        if len(buf) >= max_bytes:
            at_eof = True
        result = sniff.detect(bytes(buf), at_eof=at_eof)
        if result is not NEED_MORE:
            await trio.lowlevel.checkpoint_if_cancelled()
            return result, bytes(buf)  # type: ignore[return-value]
    return sniff.detect(bytes(buf), at_eof=True), bytes(buf)  # type: ignore[return-value]


async def sniff_stream(
    stream: trio.abc.ReceiveStream, *, timeout_s: float = DEFAULT_SNIFF_TIMEOUT_S, max_bytes: int = sniff.MAX_SNIFF_BYTES
) -> tuple[Detection, bytes]:
    """Same as sniff_socket over any Trio receive stream (e.g. after TLS termination)."""
    buf = bytearray()
    deadline = trio.current_time() + timeout_s
    while True:
        at_eof = False
        with trio.move_on_at(deadline) as waited:
            chunk = await stream.receive_some(min(_READ_CHUNK_BYTES, max_bytes - len(buf)))
        if waited.cancelled_caught or not chunk:
            at_eof = True
        else:
            buf += chunk
        if len(buf) >= max_bytes:
            at_eof = True
        result = sniff.detect(bytes(buf), at_eof=at_eof)
        if result is not NEED_MORE:
            return result, bytes(buf)  # type: ignore[return-value]


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first yields `prefix` (the sniffed bytes), then reads from the wrapped stream.

    Sends, half-close and close go straight to the wrapped stream.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = memoryview(prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return bytes(chunk)
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def buffered_bytes(self) -> int:
        """How many replayed bytes are still waiting to be received."""
        return len(self._prefix)


def socket_stream_with_prefix(sock: socket.socket, prefix: bytes) -> PrefixedStream:
    """Hand a sniffed raw socket to a stream-based handler (L7, TLS): a trio.SocketStream over it
    that first replays `prefix`. The stream takes ownership of the socket."""
    return PrefixedStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), prefix)
