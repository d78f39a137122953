"""Stream one HTTP/1.1 message body from a connection's buffer, and write one out with its framing."""

from __future__ import annotations

import math

from proxy.l7 import h1
from proxy.l7.connio import Conn, ReadTimeout


class BodyReader:
    """Yields the pieces (memoryviews into the receive buffer) of one body, framed as `framing`.

    `eof_error` is raised when the peer closes before the body is complete; `timeout_error` when
    no byte arrives before `deadline`; `protocol_error` for malformed chunking."""

    __slots__ = ("conn", "kind", "remaining", "decoder", "done", "eof_error", "timeout_error", "deadline",
                 "bytes_read")

    def __init__(self, conn: Conn, framing: h1.Framing, *, eof_error: type[Exception],
                 timeout_error: type[Exception], protocol_error: type[Exception],
                 deadline: float = math.inf) -> None:
        self.conn = conn
        self.kind = framing.kind
        self.remaining = framing.length
        self.decoder = h1.ChunkedDecoder(protocol_error) if framing.kind == h1.CHUNKED else None
        self.done = framing.kind == h1.NONE
        self.eof_error = eof_error
        self.timeout_error = timeout_error
        self.deadline = deadline
        self.bytes_read = 0

    def buffered_pieces(self) -> list[memoryview]:
        """What the buffer already holds of the body, without waiting."""
        conn = self.conn
        avail = len(conn.buf) - conn.pos
        if self.done or not avail:
            return []
        kind = self.kind
        if kind == h1.LENGTH:
            take = self.remaining if self.remaining < avail else avail
            self.remaining -= take
            self.bytes_read += take
            if not self.remaining:
                self.done = True
            return [conn.consume(take)]
        if kind == h1.CHUNKED:
            pieces, conn.pos = self.decoder.decode(conn.buf, conn.pos, len(conn.buf))
            for p in pieces:
                self.bytes_read += len(p)
            self.done = self.decoder.done
            return pieces
        # CLOSE: everything until EOF
        self.bytes_read += avail
        return [conn.take_buffered()]

    async def next_pieces(self) -> list[memoryview]:
        """The next non-empty pieces, or [] once the body is complete."""
        while not self.done:
            pieces = self.buffered_pieces()
            if pieces:
                return pieces
            if self.done:
                break
            try:
                n = await self.conn.fill(self.deadline)
            except ReadTimeout:
                raise self.timeout_error("timed out reading the body") from None
            except OSError as e:
                raise self.eof_error(f"connection reset while reading the body: {e}") from None
            if n == 0:
                if self.kind == h1.CLOSE:
                    self.done = True
                    break
                raise self.eof_error("connection closed before the body was complete")
        return []


class _NoBody:
    """The body of a request without one: shared, since nothing about it ever changes."""

    __slots__ = ()
    kind = h1.NONE
    done = True
    bytes_read = 0

    def buffered_pieces(self) -> list[memoryview]:
        return []

    async def next_pieces(self) -> list[memoryview]:
        return []


NO_BODY = _NoBody()


def encode_pieces(kind: int, pieces: list, out: list) -> None:
    """Append the wire form of body pieces in framing `kind` to `out` (a send_many list)."""
    if kind == h1.CHUNKED:
        for p in pieces:
            n = len(p)
            if n:
                out.append(h1.chunk_header(n))
                out.append(p)
                out.append(h1.CHUNK_END)
    else:
        out.extend(pieces)
