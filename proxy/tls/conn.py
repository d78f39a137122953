"""One TLS connection with the interface of `proxy.l7.connio.Conn`, so HTTP/1.1, HTTP/2 and TCP code
runs over it unchanged.

Theory of operation
-------------------
The TLS state machine is the stdlib's `ssl.SSLObject` between two `ssl.MemoryBIO`s: ciphertext
from the socket is written into `incoming`, plaintext is read out of the SSLObject; plaintext
written into the SSLObject comes out of `outgoing` as ciphertext for the socket. The SSLObject never
touches the socket, so the socket stays the plain non-blocking stdlib socket of `Conn`, with the
same try-the-syscall-first rule and the same waits (the worker's reactor, deadlines by the sweeper).
docs/tls.md says why this and not `trio.SSLStream`, with figures.

Plaintext lands in `Conn`'s buffer (`buf` + `pos`), so parsers see no difference.

Ciphertext leaves through one ordered queue (`_pending`). Two tasks may produce it at once (HTTP/2
runs a reader and a writer; a read can produce TLS records of its own, such as the answer to a TLS
1.3 KeyUpdate), and records must reach the socket in the order the SSLObject made them. So every
producer appends to the queue, and only one task at a time, the one that set `_flushing`, sends from
its head; the others wait for `_flushed` until the queue is empty. The `*_nowait` sends encrypt
and send what the kernel takes without awaiting, like `Conn`'s; when ciphertext is left over they
return an empty rest, which the caller hands back to `send_all`/`send_many` to wait until it is out.
Plaintext is encrypted only when no older ciphertext waits, so what waits stays bounded by one send.

Renegotiation is off in every context (proxy/tls/context.py), so a write never needs a read.

Errors: a TLS alert or a malformed record is a `TlsError` (a ConnectionError, as OS errors on a
`Conn` are, so the drivers treat it as a lost connection) that keeps the `ssl.SSLError` as cause and
carries a short `reason` for stats. A handshake failure is a `TlsHandshakeError`.
"""

from __future__ import annotations

import math
import socket
import ssl

import trio

from proxy.l7.connio import RECV_BYTES, Conn, ReadTimeout
from proxy.l7.reactor import Reactor
from proxy.l7.timeouts import TimeoutSweeper

_INF = math.inf
_EMPTY = memoryview(b"")
SPIFFE_PREFIX = "spiffe://"
# plaintext pieces up to this total are joined and encrypted as one write (fewer, fuller records)
_JOIN_BYTES = 64 * 1024


class TlsError(ConnectionError):
    """The TLS layer failed (an alert, a malformed record, a truncated handshake). `reason` is a
    short name for stats (proxy/tls/errors.py)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TlsHandshakeError(TlsError):
    """The handshake did not complete."""


class HandshakeTimeout(TlsHandshakeError):
    """No handshake within the allowed time (Envoy's transport_socket_connect_timeout)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "handshake_timeout")


def failure_reason(error: ssl.SSLError) -> str:
    """A short, stable name for why TLS failed, for stats and logs (Envoy's ssl.* stat words where
    there is one)."""
    text = (error.reason or "").upper()
    if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return "fail_verify_error"
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "fail_verify_no_cert"
    if "NO_SHARED_CIPHER" in text or "NO_CIPHERS" in text:
        return "no_shared_cipher"
    if "UNSUPPORTED_PROTOCOL" in text or "VERSION" in text:
        return "unsupported_protocol"
    if "NO_APPLICATION_PROTOCOL" in text:
        return "no_application_protocol"
    if "ALERT" in text:
        return "alert_received"
    if isinstance(error, ssl.SSLEOFError) or "EOF" in text:
        return "connection_closed"
    if "WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text or "RECORD" in text or "PACKET" in text:
        return "not_tls"
    return "connection_error"


class TlsConn(Conn):
    """A `Conn` whose bytes are TLS records. Make it with an unconnected SSLObject's context
    (`ssl.SSLContext`) and `server_side`; call `handshake()` before any other IO."""

    __slots__ = ("ssl", "incoming", "outgoing", "_pending", "_flushing", "_flushed",
                 "_shutdown_after_flush", "_eof", "_handshake_done", "_close_notify_sent")
    short_fill_empties_socket = False  # ciphertext may be left in the socket after a short plaintext fill

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"", reactor: Reactor | None = None,
                 sweeper: TimeoutSweeper | None = None, idle_s: float = math.inf) -> None:
        """`initial`: ciphertext already read from the socket (a sniffer's peek of the ClientHello),
        fed to the TLS layer first. `server_hostname`: a client's SNI and the name the peer's
        certificate is checked against (when the context checks hostnames)."""
        super().__init__(sock, b"", reactor, sweeper, idle_s)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        if initial:
            self.incoming.write(initial)
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self._pending: list = []  # ciphertext not yet taken by the kernel, oldest first
        self._flushing = False  # one task sends from _pending at a time
        self._flushed: trio.Event | None = None  # set when that task stops
        self._shutdown_after_flush = False
        self._eof = False  # the socket said EOF: nothing more will come into `incoming`
        self._handshake_done = False
        self._close_notify_sent = False

    # ---- what the handshake told us

    @property
    def alpn_protocol(self) -> str | None:
        return self.ssl.selected_alpn_protocol()

    @property
    def server_name(self) -> str | None:
        """The SNI the client sent (server side); None without one."""
        return getattr(self.ssl, "sni", None)

    @property
    def version(self) -> str | None:
        return self.ssl.version()

    def peer_certificate(self) -> dict | None:
        """The verified peer certificate (as `SSLObject.getpeercert()`), None if there is none."""
        return self.ssl.getpeercert() or None

    def peer_certificate_der(self) -> bytes | None:
        return self.ssl.getpeercert(binary_form=True)

    def peer_principal(self) -> str | None:
        """The verified peer certificate's SPIFFE identity without `spiffe://`
        ("cluster.local/ns/foo/sa/bar"), as Istio's principals are written; None without one."""
        certificate = self.ssl.getpeercert() if self._handshake_done else None
        for kind, value in (certificate or {}).get("subjectAltName", ()):
            if kind == "URI" and value.startswith(SPIFFE_PREFIX):
                return value[len(SPIFFE_PREFIX):]
        return None

    # ---- handshake

    async def handshake(self, timeout_s: float = _INF) -> None:
        """Run the TLS handshake within `timeout_s` (one cancel scope per connection, not per
        request). Raises HandshakeTimeout past it, TlsHandshakeError when TLS fails, ConnectionError
        when the peer goes away."""
        with trio.move_on_after(timeout_s) as scope:
            while True:
                try:
                    self.ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self._queue_outgoing()  # the alert that tells the peer why
                    try:
                        self._send_pending_nowait()
                    except OSError:
                        pass  # the peer is gone already; the handshake error is the news
                    raise TlsHandshakeError(f"TLS handshake failed: {e.reason or e}", failure_reason(e)) from e
                await self._flush()
                if not await self._receive_ciphertext():
                    raise TlsHandshakeError("peer closed the connection during the TLS handshake",
                                            "connection_closed")
            await self._flush()
            self._handshake_done = True
        if scope.cancelled_caught:
            raise HandshakeTimeout(f"no TLS handshake within {timeout_s} s")

    async def _receive_ciphertext(self, deadline: float = _INF, wait_first: bool = False) -> bool:
        """Move what the socket has into `incoming`, waiting for it if there is nothing; False at EOF."""
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
                    await self._wait_readable()
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
            self._eof = True
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    # ---- reading

    def _read_plaintext(self, size: int = RECV_BYTES) -> bytes | None:
        """Decrypt what `incoming` holds, at most `size` bytes; b"" at the peer's close_notify or EOF,
        None when more ciphertext is needed."""
        try:
            data = self.ssl.read(size)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return b""  # close_notify
        except ssl.SSLEOFError:
            # EOF without close_notify: ends the stream like a TCP FIN; HTTP framing notices a
            # truncated message on its own
            return b""
        except ssl.SSLError as e:
            raise TlsError(f"TLS error: {e.reason or e}", failure_reason(e)) from e
        if not data and self._eof:
            return b""
        return data

    async def fill(self, deadline: float = _INF, *, wait_first: bool = False) -> int:
        """As `Conn.fill`: decrypt more bytes onto the buffer; returns how many (0 at EOF)."""
        incoming = self.incoming
        while True:
            # Only new ciphertext (or its end) lets a read make progress: between fills the SSLObject
            # holds no decrypted bytes (the drain below), and no context turns on OpenSSL's read-ahead,
            # so a whole record never waits inside it undecrypted. Reading anyway would only raise
            # SSLWantReadError (~1.5 µs per raise, once per request).
            ciphertext = incoming.pending
            if ciphertext or self._eof:
                # plaintext is never longer than the ciphertext it came from, unless part of a record
                # arrived earlier: sizing the read by it spares allocating (and shrinking) RECV_BYTES
                # for every small request
                size = ciphertext or RECV_BYTES
                data = self._read_plaintext(size)
                if self.outgoing.pending:  # the read made records of its own (a KeyUpdate answer, an alert)
                    self._queue_outgoing()
                    await self._flush()
                if data is not None:
                    break
                if self._eof:
                    return 0
            await self._receive_ciphertext(deadline, wait_first)
            wait_first = False
        if not data:
            return 0
        if len(data) == size:  # the read may have cut a record short (each pending() call drops the GIL)
            while self.ssl.pending():
                more = self._read_plaintext()
                if not more:
                    break
                data += more
        if self.pos < len(self.buf):
            self.buf = self.buf[self.pos:] + data
        else:
            self.buf = data
        self.pos = 0
        return len(data)

    def peek_closed(self) -> bool:
        """For an idle pooled connection: has the peer closed it, or sent stray plaintext? Records
        without application data (a TLS 1.3 session ticket) leave it usable."""
        if self.buffered or self.ssl.pending():
            return True
        try:
            while True:
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    return True
                self.incoming.write(data)
        except BlockingIOError:
            pass
        except OSError:
            return True
        try:
            return self._read_plaintext() is not None
        except TlsError:
            return True

    # ---- writing

    def _queue_outgoing(self) -> None:
        data = self.outgoing.read()
        if data:
            self._pending.append(data)

    def _encrypt(self, data) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.ssl.write(view)
            except ssl.SSLError as e:
                raise TlsError(f"TLS error: {e.reason or e}", failure_reason(e)) from e
            view = view[n:]
        self._queue_outgoing()

    def _send_pending_nowait(self) -> bool:
        """Send queued ciphertext until the kernel says EAGAIN; True when none is left. Leaves the
        queue to the flushing task when there is one."""
        if self._flushing:
            return not self._pending
        pending, sock = self._pending, self.sock
        while pending:
            head = pending[0]
            try:
                n = sock.send(head)
            except BlockingIOError:
                return False
            if n == len(head):
                pending.pop(0)
            else:
                pending[0] = memoryview(head)[n:]
        if self._shutdown_after_flush:
            self._shutdown_after_flush = False
            self._shutdown_socket()
        return True

    async def _flush(self) -> None:
        """Wait until every record the SSLObject made is with the kernel."""
        self._queue_outgoing()
        while self._pending or self._flushing:
            if self._flushing:  # another task sends; our records are behind its
                if self._flushed is None:
                    self._flushed = trio.Event()
                await self._flushed.wait()
                continue
            self._flushing = True
            try:
                pending, sock = self._pending, self.sock
                while pending:
                    head = pending[0]
                    try:
                        n = sock.send(head)
                    except BlockingIOError:
                        await self._wait_writable()
                        continue
                    if n == len(head):
                        pending.pop(0)
                    else:
                        pending[0] = memoryview(head)[n:]
            finally:
                self._flushing = False
                if self._flushed is not None:
                    self._flushed.set()
                    self._flushed = None
            if self._shutdown_after_flush:
                self._shutdown_after_flush = False
                self._shutdown_socket()

    def send_nowait(self, data) -> memoryview | None:
        """As `Conn.send_nowait`. Older ciphertext still waiting: nothing is encrypted and `data` is
        the rest. Otherwise all of it is encrypted; when the kernel did not take all the records, the
        rest is empty: `send_all(rest)` waits until they are out."""
        if self._pending or self._flushing:
            return memoryview(data)
        # the common case written out (one write, one send, no queue): a response per request
        try:
            written = self.ssl.write(data)
        except ssl.SSLError as e:
            raise TlsError(f"TLS error: {e.reason or e}", failure_reason(e)) from e
        if written < len(data):
            self._encrypt(memoryview(data)[written:])  # queues every record made so far, in order
            return None if self._send_pending_nowait() else _EMPTY
        ciphertext = self.outgoing.read()
        try:
            sent = self.sock.send(ciphertext)
        except BlockingIOError:
            sent = 0
        if sent < len(ciphertext):
            self._pending.append(memoryview(ciphertext)[sent:] if sent else ciphertext)
            return None if self._send_pending_nowait() else _EMPTY
        if self._shutdown_after_flush:
            self._shutdown_after_flush = False
            self._shutdown_socket()
        return None

    async def send_all(self, data) -> None:
        if data:
            self._encrypt(data)
        await self._flush()

    def send_many_nowait(self, parts: list) -> list | None:
        if self._pending:
            return parts
        self._encrypt_many(parts)
        return None if self._send_pending_nowait() else [_EMPTY]

    async def send_many(self, parts: list) -> None:
        self._encrypt_many(parts)
        await self._flush()

    def _encrypt_many(self, parts: list) -> None:
        total = 0
        for part in parts:
            total += len(part)
        if total <= _JOIN_BYTES and len(parts) > 1:
            self._encrypt(b"".join(parts))
            return
        for part in parts:
            if len(part):
                self._encrypt(part)

    # ---- ending

    def shutdown_write(self) -> None:
        """Send close_notify, then end the TCP write side once the queued records are out."""
        if self.closed:
            return
        if self._handshake_done and not self._close_notify_sent:
            self._close_notify_sent = True
            try:
                self.ssl.unwrap()
            except ssl.SSLError:  # SSLWantReadError: ours is sent; the peer's is not awaited (as Envoy)
                pass
            self._queue_outgoing()
        if self._send_pending_nowait() and not self._flushing:
            self._shutdown_socket()
        else:
            self._shutdown_after_flush = True

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed and self._handshake_done and not self._close_notify_sent and not self._pending:
            # a close_notify when it costs no wait, so the peer sees a clean end rather than a cut
            self._close_notify_sent = True
            try:
                self.ssl.unwrap()
            except ssl.SSLError:
                pass
            self._queue_outgoing()
            try:
                self._send_pending_nowait()
            except OSError:
                pass  # the peer is gone already
        super().close()
