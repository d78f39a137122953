"""One TLS connection with the interface of `proxy.l7.connio.Conn`, so HTTP/1.1, HTTP/2 and TCP code
runs over it unchanged.

Theory of operation
-------------------
The TLS state machine is an OpenSSL `SSL` (proxy/tls/openssl.py's library, called directly through
its cffi binding) between two memory BIOs: ciphertext from the socket is written into `incoming`,
plaintext is read out of the SSL; plaintext written into the SSL comes out of `outgoing` as
ciphertext for the socket. The SSL never touches the socket, so the socket stays the plain
non-blocking stdlib socket of `Conn`, with the same try-the-syscall-first rule and the same waits
(the worker's reactor, deadlines by the sweeper). docs/tls.md says why this and not
`trio.SSLStream` or the stdlib's `ssl`, with figures.

Each read, write and BIO transfer is one cffi call on one of the library's two scratch buffers
(shared by every connection: used within one synchronous step, never across an await), so no
per-record Python object is made besides the bytes handed on. Received ciphertext and decrypted
plaintext use the read buffer, ciphertext going out the send buffer: a read that fails after
plaintext (an alert behind whole records) makes records while that plaintext is still in the read
buffer.

Plaintext lands in `Conn`'s buffer (`buf` + `pos`), so parsers see no difference.

Ciphertext leaves through one ordered queue (`_pending`). Two tasks may produce it at once (HTTP/2
runs a reader and a writer; a read can produce TLS records of its own, such as the answer to a TLS
1.3 KeyUpdate), and records must reach the socket in the order the SSL made them. So every
producer appends to the queue, and only one task at a time, the one that set `_flushing`, sends from
its head; the others wait for `_flushed` until the queue is empty. The `*_nowait` sends encrypt
and send what the kernel takes without awaiting, like `Conn`'s; when ciphertext is left over they
return an empty rest, which the caller hands back to `send_all`/`send_many` to wait until it is out.
Plaintext is encrypted only when no older ciphertext waits, so what waits stays bounded by one send.

Renegotiation is off in every context (proxy/tls/context.py), so a write never needs a read. A
read can still make records (the alert refusing a renegotiation, a TLS 1.3 KeyUpdate answer): they
are sent at once when the read brought no plaintext, else ahead of the next write's (fill says why).

Errors: a TLS alert or a malformed record is a `TlsError` (a ConnectionError, as OS errors on a
`Conn` are, so the drivers treat it as a lost connection) that keeps the `OpenSslError` as cause and
carries a short `reason` for stats. A handshake failure is a `TlsHandshakeError`.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from time import monotonic

import trio
from trio.lowlevel import wait_readable

from proxy.l7.connio import RECV_BYTES, Conn, ReadTimeout
from proxy.l7.reactor import Reactor
from proxy.l7.timeouts import TimeoutSweeper
from proxy.tls.client_cert import client_cert_element
from proxy.tls.context import TlsContext
from proxy.tls.openssl import SCRATCH_BYTES, Library, OpenSslError

_INF = math.inf
_EMPTY = memoryview(b"")
SPIFFE_PREFIX = "spiffe://"
# plaintext pieces up to this total are joined and encrypted as one write (fewer, fuller records)
_JOIN_BYTES = 64 * 1024
# the most plaintext one TLS record carries (RFC 8446 5.1, RFC 5246 6.2.1): a read that brings this
# much may have whole records behind it
RECORD_PLAINTEXT_BYTES = 16 * 1024
# subjectAltNames by certificate (DER): a peer reconnecting with the same certificate is parsed once
_SAN_CACHE_SIZE = 1024
_san_cache: dict[bytes, tuple] = {}

# the library, bound on the first connection (importing this module loads no TLS library)
_library: Library | None = None
_lib = _ffi = _NULL = None
_read_c = _read_view = _read_memory = None  # the read scratch buffer
_send_c = _send_view = _send_memory = None  # the send scratch buffer
_WANT_READ = _ZERO_RETURN = _SYSCALL = _TLS1_3 = 0
_MEMORY_BIO = None  # BIO_s_mem(): OpenSSL's one static method table of memory BIOs, asked once


def _bind(library: Library) -> None:
    global _library, _lib, _ffi, _NULL, _read_c, _read_view, _read_memory, _WANT_READ, _ZERO_RETURN, _SYSCALL
    global _TLS1_3, _send_c, _send_view, _send_memory, _MEMORY_BIO
    _library, _lib, _ffi = library, library.lib, library.ffi
    _NULL = _ffi.NULL
    read, send = library.read_scratch, library.send_scratch
    _read_c, _read_view, _read_memory = read.pointer, read.view, read.memory
    _send_c, _send_view, _send_memory = send.pointer, send.view, send.memory
    _WANT_READ, _ZERO_RETURN, _SYSCALL = _lib.SSL_ERROR_WANT_READ, _lib.SSL_ERROR_ZERO_RETURN, _lib.SSL_ERROR_SYSCALL
    _TLS1_3 = _lib.TLS1_3_VERSION
    _MEMORY_BIO = _lib.BIO_s_mem()


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


def failure_reason(error: OpenSslError) -> str:
    """A short, stable name for why TLS failed, for stats and logs (Envoy's ssl.* stat words where
    there is one)."""
    text = error.reason
    if error.verify_message or "CERTIFICATE_VERIFY_FAILED" in text:
        return "fail_verify_error"
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "fail_verify_no_cert"
    if "NO_SHARED_CIPHER" in text or "NO_CIPHERS" in text:
        return "no_shared_cipher"
    # bytes that are not TLS at all (HTTP, an HTTPS proxy's CONNECT, another protocol's banner) before
    # the version checks, whose names WRONG_VERSION_NUMBER shares
    if "WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text or "HTTPS_PROXY_REQUEST" in text:
        return "not_tls"
    if "UNSUPPORTED_PROTOCOL" in text or "VERSION" in text:
        return "unsupported_protocol"
    if "NO_APPLICATION_PROTOCOL" in text:
        return "no_application_protocol"
    if "ALERT" in text:
        return "alert_received"
    if "EOF" in text:
        return "connection_closed"
    if "RECORD" in text or "PACKET" in text:
        return "not_tls"
    return "connection_error"


def subject_alt_names(der: bytes) -> tuple:
    """A certificate's subjectAltNames as the stdlib's getpeercert() lists them: ("DNS", name),
    ("URI", uri), ("IP Address", address)."""
    names = _san_cache.get(der)
    if names is not None:
        return names
    from cryptography import x509

    try:
        extension = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = ()
    else:
        names = (tuple(("DNS", n) for n in extension.get_values_for_type(x509.DNSName))
                 + tuple(("URI", n) for n in extension.get_values_for_type(x509.UniformResourceIdentifier))
                 + tuple(("IP Address", str(n)) for n in extension.get_values_for_type(x509.IPAddress)))
    if len(_san_cache) >= _SAN_CACHE_SIZE:
        _san_cache.clear()
    _san_cache[der] = names
    return names


def _written(write) -> bytes | None:
    """What `write(bio)` puts into a fresh memory BIO (the binding has no i2d_X509 or name printer
    to a buffer); None when it fails."""
    lib, ffi = _lib, _ffi
    bio = lib.BIO_new(_MEMORY_BIO)
    try:
        if write(bio) < 1:
            lib.ERR_clear_error()
            return None
        data = ffi.new("char **")
        size = lib.BIO_get_mem_data(bio, data)
        return ffi.buffer(data[0], size)[:]
    finally:
        lib.BIO_free(bio)


def _certificate_der(certificate) -> bytes | None:
    return _written(lambda bio: _lib.i2d_X509_bio(bio, certificate))


class TlsConn(Conn):
    """A `Conn` whose bytes are TLS records. Make it with a `TlsContext` and `server_side`; call
    `handshake()` before any other IO."""

    __slots__ = ("context", "ssl", "incoming", "outgoing", "_pending", "_flushing", "_flushed",
                 "_shutdown_after_flush", "_eof", "_read_error", "_handshake_done", "_close_notify_sent",
                 "session_key", "_peer_der")
    short_fill_empties_socket = False  # ciphertext may be left in the socket after a short plaintext fill

    def __init__(self, sock: socket.socket, context: TlsContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"", reactor: Reactor | None = None,
                 sweeper: TimeoutSweeper | None = None, idle_s: float = math.inf, session=None) -> None:
        """`initial`: ciphertext already read from the socket (a sniffer's peek of the ClientHello),
        fed to the TLS layer first. `server_hostname`: a client's SNI and the name the peer's
        certificate is checked against (when the context checks hostnames). `session`: a client's
        kept session to offer (proxy/tls/sessions.py); the server may resume it or not."""
        super().__init__(sock, b"", reactor, sweeper, idle_s)
        try:
            self._start(context, server_side, server_hostname, initial, session)
        except BaseException:
            Conn.close(self)  # registered with the reactor and sweeper above: undo that with the socket
            raise

    def _start(self, context: TlsContext, server_side: bool, server_hostname: str | None, initial: bytes,
               session) -> None:
        if _library is not context.library:
            _bind(context.library)
        lib, ffi = _lib, _ffi
        pointer = lib.SSL_new(context.pointer)
        if pointer == _NULL:
            raise TlsError(f"TLS error: {context.library.error('SSL_new')}", "connection_error")
        self.ssl = ffi.gc(pointer, lib.SSL_free)
        self.context = context  # its callbacks live as long as the SSL that calls them
        self.incoming = lib.BIO_new(_MEMORY_BIO)
        self.outgoing = lib.BIO_new(_MEMORY_BIO)
        # empty: wait for more (until the socket's EOF). `outgoing` keeps the default: it is only
        # drained, where an empty read's 0 and -1 both mean "nothing"
        lib.BIO_set_mem_eof_return(self.incoming, -1)
        lib.SSL_set_bio(pointer, self.incoming, self.outgoing)  # the SSL owns and frees them
        if server_side:
            lib.SSL_set_accept_state(pointer)
        else:
            lib.SSL_set_connect_state(pointer)
            if server_hostname:
                _set_server_hostname(pointer, server_hostname, context.check_hostname)
            elif context.check_hostname:  # as the stdlib refuses: a check with no name would pass anyone
                raise TlsError("TLS error: the server's name to check is missing (check_hostname)", "connection_error")
            if session is not None:
                lib.SSL_set_session(pointer, session)  # takes its own reference
        if initial:
            lib.BIO_write(self.incoming, bytes(initial), len(initial))
        self._pending: list = []  # ciphertext not yet taken by the kernel, oldest first
        self._flushing = False  # one task sends from _pending at a time
        self._flushed: trio.Event | None = None  # set when that task stops
        self._shutdown_after_flush = False
        self._eof = False  # the socket said EOF (or a read met the end): nothing more will come into `incoming`
        self._read_error: TlsError | None = None  # a failure _read_more met, raised by the next read
        self._handshake_done = False
        self._close_notify_sent = False
        # a client's key in its context's sessions, set by the caller once the server passed its
        # checks: the first plaintext read keeps the session (its tickets came before it)
        self.session_key = None
        self._peer_der: bytes | None | bool = False  # False: not read yet (read once, after the handshake)

    # ---- what the handshake told us

    @property
    def alpn_protocol(self) -> str | None:
        holder, length = _library.pointer_holder, _library.length_holder
        _lib.SSL_get0_alpn_selected(self.ssl, holder, length)
        if not length[0]:
            return None
        return _ffi.buffer(holder[0], length[0])[:].decode("ascii", "replace")

    @property
    def server_name(self) -> str | None:
        """The SNI the client sent (server side); None without one."""
        name = _lib.SSL_get_servername(self.ssl, _lib.TLSEXT_NAMETYPE_host_name)
        return _ffi.string(name).decode("ascii", "replace") if name != _NULL else None

    @property
    def session_reused(self) -> bool:
        """The handshake resumed a session (a ticket) instead of exchanging certificates."""
        return bool(_lib.SSL_session_reused(self.ssl))

    @property
    def version(self) -> str | None:
        if not self._handshake_done:
            return None
        return _ffi.string(_lib.SSL_get_version(self.ssl)).decode("ascii")

    @property
    def protocol_version_number(self) -> int:
        """The protocol version OpenSSL settled on (0x0304: TLS 1.3), also when the handshake failed
        after settling it."""
        return _lib.SSL_version(self.ssl)

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite's OpenSSL name (TLS 1.3: "TLS_AES_128_GCM_SHA256")."""
        if not self._handshake_done:
            return None
        cipher = _lib.SSL_get_current_cipher(self.ssl)
        return _ffi.string(_lib.SSL_CIPHER_get_name(cipher)).decode("ascii") if cipher != _NULL else None

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate, DER (the binding has no i2d_X509: written through a memory BIO);
        read once after the handshake (the principal and x-forwarded-client-cert both ask)."""
        der = self._peer_der
        if der is not False:
            return der
        certificate = _lib.SSL_get_peer_certificate(self.ssl)
        if certificate == _NULL:
            der = None
        else:
            try:
                der = _certificate_der(certificate)
            finally:
                _lib.X509_free(certificate)
        if self._handshake_done:
            self._peer_der = der
        return der

    def local_certificate_der(self) -> bytes | None:
        """The certificate this side presented, DER; None without one."""
        certificate = _lib.SSL_get_certificate(self.ssl)  # the SSL's own reference: not freed here
        return _certificate_der(certificate) if certificate != _NULL else None

    def client_cert_element(self, with_cert: bool) -> bytes | None:
        """A server side's x-forwarded-client-cert element (proxy/tls/client_cert.py); None when the
        client presented no certificate."""
        if not self._handshake_done:
            return None
        der = self.peer_certificate_der()
        if der is None:
            return None
        subject = self.peer_subject_rfc2253 if _library.boringssl else None
        return client_cert_element(der, self.local_certificate_der(), with_cert, subject)

    def peer_subject_rfc2253(self) -> str | None:
        """The peer certificate's subject as BoringSSL prints it in RFC 2253 form (X509_NAME_print_ex,
        XN_FLAG_RFC2253: what Envoy writes in x-forwarded-client-cert); None without a certificate."""
        lib = _lib
        certificate = lib.SSL_get_peer_certificate(self.ssl)
        if certificate == _NULL:
            return None
        try:
            # the printed length, 0 for an empty subject (a mesh workload certificate's): +1 to tell it from failure
            printed = _written(lambda bio: lib.X509_NAME_print_ex(
                bio, lib.X509_get_subject_name(certificate), 0, lib.XN_FLAG_RFC2253) + 1)
        finally:
            lib.X509_free(certificate)
        return printed.decode("utf-8", "replace") if printed is not None else None

    def peer_certificate(self) -> dict | None:
        """The verified peer certificate's subjectAltNames, shaped as the stdlib's `getpeercert()`
        ({"subjectAltName": (("DNS", "example.com"), ...)}); None without one or when the context
        does not verify peers (insecureSkipVerify)."""
        names = self._verified_peer_names()
        return {"subjectAltName": names} if names is not None else None

    def _verified_peer_names(self) -> tuple | None:
        if not self._handshake_done or not (_lib.SSL_get_verify_mode(self.ssl) & _lib.SSL_VERIFY_PEER):
            return None
        der = self.peer_certificate_der()
        return subject_alt_names(der) if der is not None else None

    def peer_principal(self) -> str | None:
        """The verified peer certificate's SPIFFE identity without `spiffe://`
        ("cluster.local/ns/foo/sa/bar"), as Istio's principals are written; None without one."""
        for kind, value in self._verified_peer_names() or ():
            if kind == "URI" and value.startswith(SPIFFE_PREFIX):
                return value[len(SPIFFE_PREFIX):]
        return None

    # ---- handshake

    async def handshake(self, timeout_s: float = _INF) -> None:
        """Run the TLS handshake within `timeout_s`. Raises HandshakeTimeout past it,
        TlsHandshakeError when TLS fails, ConnectionError when the peer goes away.

        An accepted connection with a sweeper (the data path's) has the deadline as its `io_deadline`,
        which the sweeper enforces for every wait as it does for reads (late by up to its period, under
        a second: nothing against a handshake timeout of seconds), so no cancel scope is made per new
        connection (about 8 µs of CPU). Otherwise a cancel scope: an upstream connect's deadline is
        its connect timeout's remainder and must be exact."""
        _lib.ERR_clear_error()  # a stale error would turn a wait into a failure
        if self.sweeper is None or timeout_s == _INF or not self.context.server_side:
            with trio.move_on_after(timeout_s) as scope:
                await self._run_handshake()
            if scope.cancelled_caught:
                raise HandshakeTimeout(f"no TLS handshake within {timeout_s} s")
            return
        self.io_deadline = monotonic() + timeout_s
        try:
            await self._run_handshake()
        except (ReadTimeout, ConnectionAbortedError):
            if self.timed_out:  # the sweeper woke a wait past the deadline
                raise HandshakeTimeout(f"no TLS handshake within {timeout_s} s") from None
            raise
        finally:
            self.io_deadline = _INF

    async def _run_handshake(self) -> None:
        lib, ssl = _lib, self.ssl
        while True:
            result = lib.SSL_do_handshake(ssl)
            if result == 1:
                break
            if lib.SSL_get_error(ssl, result) != _WANT_READ:
                e = _library.error(ssl=ssl)
                self._queue_outgoing()  # the alert that tells the peer why
                try:
                    self._send_pending_nowait()
                except OSError:
                    pass  # the peer is gone already; the handshake error is the news
                raise TlsHandshakeError(f"TLS handshake failed: {e}", failure_reason(e)) from e
            await self._flush()
            if not await self._receive_ciphertext():
                raise TlsHandshakeError("peer closed the connection during the TLS handshake",
                                        "connection_closed")
        if not (self.context.server_side and lib.SSL_version(ssl) == _TLS1_3):
            await self._flush()
        # else: what a TLS 1.3 server makes after the client's Finished is its session tickets,
        # which the client does not wait for: they stay in `outgoing` and leave ahead of the
        # first write's records (or the close_notify), one send instead of two
        self._handshake_done = True

    async def _receive_ciphertext(self) -> bool:
        """Move what the socket has into `incoming`, waiting for it if there is nothing; False at EOF.
        For the handshake (its deadline is `io_deadline` or the handshake's cancel scope); fill has the
        same receive written out."""
        sock = self.sock
        while True:
            try:
                n = sock.recv_into(_read_memory, RECV_BYTES)
                break
            except BlockingIOError:
                pass
            if self.timed_out:
                raise ReadTimeout()
            try:
                await self._wait_readable()
            except trio.ClosedResourceError:
                if self.timed_out:
                    raise ReadTimeout() from None
                raise ConnectionAbortedError("connection closed while waiting to read") from None
        if not n:
            self._eof = True
            _lib.BIO_set_mem_eof_return(self.incoming, 0)  # empty now reads as the end
            return False
        _lib.BIO_write(self.incoming, _read_c, n)
        return True

    # ---- reading

    def _read_plaintext(self) -> bytes | None:
        """Decrypt what `incoming` holds (one call: the scratch buffer takes more than a record); b""
        at the peer's close_notify or EOF, None when more ciphertext is needed."""
        n = _lib.SSL_read(self.ssl, _read_c, SCRATCH_BYTES)
        if n > 0:
            if self.session_key is not None:
                self.context.sessions.keep(self.session_key, self.ssl)
                self.session_key = None
            if n == RECORD_PLAINTEXT_BYTES:
                n = self._read_more(n)
            return _read_view[0:n]
        return self._read_failed(n)

    def _read_more(self, n: int) -> int:
        """After a read that brought a full record (the peer streams): the records `incoming` holds
        too, decrypted behind it in the scratch buffer, so a stream moves in reads of up to a
        receive's worth (one fill, one send onward) rather than one per 16 KiB record. Returns the
        plaintext now in the scratch buffer. The end or a failure met here, after plaintext this
        read returns, is what the next read reports."""
        lib, ssl, incoming = _lib, self.ssl, self.incoming
        while n + RECORD_PLAINTEXT_BYTES <= SCRATCH_BYTES and lib.BIO_get_mem_data(incoming, _NULL):
            more = lib.SSL_read(ssl, _read_c + n, SCRATCH_BYTES - n)
            if more > 0:
                n += more
                continue
            if lib.SSL_get_error(ssl, more) != _WANT_READ:  # a partial record waits for more ciphertext
                try:
                    self._read_failed(more)
                except TlsError as e:
                    self._read_error = e
                self._eof = True  # nothing more is read: the next fill reads the end (or raises)
            break
        return n

    def _read_failed(self, n: int) -> bytes | None:
        """What an SSL_read that returned `n` <= 0 means: None when more ciphertext is needed, b"" at
        the end; raises TlsError (after sending the alert) when TLS failed."""
        if self._read_error is not None:
            raise self._read_error
        ssl = self.ssl
        error = _lib.SSL_get_error(ssl, n)
        if error == _WANT_READ:
            return None
        if error == _ZERO_RETURN or error == _SYSCALL:
            _lib.ERR_clear_error()
            return b""  # close_notify, or the socket's EOF (SYSCALL at our BIO's end)
        e = _library.error(ssl=ssl)
        if "EOF" in e.reason:
            # EOF without close_notify: ends the stream like a TCP FIN; HTTP framing notices a
            # truncated message on its own
            return b""
        self._queue_outgoing()  # the alert that tells the peer why
        try:
            self._send_pending_nowait()
        except OSError:
            pass
        raise TlsError(f"TLS error: {e}", failure_reason(e)) from e

    async def fill(self, deadline: float = _INF, *, wait_first: bool = False) -> int:
        """As `Conn.fill`: decrypt more bytes onto the buffer; returns how many (0 at EOF)."""
        # Only new ciphertext (or its end) lets a read make progress: between fills the SSL holds no
        # decrypted bytes (a read takes whole records), and no context turns on OpenSSL's
        # read-ahead, so a whole record never waits inside it undecrypted. So the SSL is read when
        # the incoming BIO holds ciphertext (asked once) or right after a receive, never to hear
        # WANT_READ. A read that brought no plaintext may have made records of its own (the alert
        # refusing a renegotiation, a KeyUpdate answer): they go out now, as the peer may wait for
        # them. After one that brought plaintext (the common case, not asked after), any stay in
        # `outgoing` and leave, in order, ahead of the next write's.
        data = None
        if self._eof or _lib.BIO_get_mem_data(self.incoming, _NULL):
            data = self._read_plaintext()
            if not data:
                await self._send_own_records()
        while data is None:
            if self._eof:
                return 0
            # the receive and its common wait written out here, as in Conn.fill: no coroutine frame
            # between this one and the reactor on the path every request takes
            sock = self.sock
            while True:
                if not wait_first:
                    try:
                        n = sock.recv_into(_read_memory, RECV_BYTES)
                        break
                    except BlockingIOError:
                        pass
                wait_first = False
                if self.timed_out:
                    raise ReadTimeout()
                try:
                    if deadline == _INF:
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
            if n:
                _lib.BIO_write(self.incoming, _read_c, n)
            else:
                self._eof = True
                _lib.BIO_set_mem_eof_return(self.incoming, 0)  # empty now reads as the end
            data = self._read_plaintext()
            if not data:
                await self._send_own_records()
        if not data:
            return 0
        if len(data) == SCRATCH_BYTES:  # the read may have left plaintext behind
            while _lib.SSL_pending(self.ssl):
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

    async def _send_own_records(self) -> None:
        if _lib.BIO_get_mem_data(self.outgoing, _NULL):
            self._queue_outgoing()
            await self._flush()

    def peek_closed(self) -> bool:
        """For an idle pooled connection: has the peer closed it, or sent stray plaintext? Records
        without application data (a TLS 1.3 session ticket) leave it usable."""
        if self.buffered or _lib.SSL_pending(self.ssl):
            return True
        try:
            while True:
                n = self.sock.recv_into(_read_memory, RECV_BYTES)
                if not n:
                    return True
                _lib.BIO_write(self.incoming, _read_c, n)
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
        outgoing, pending = self.outgoing, self._pending
        while True:
            n = _lib.BIO_read(outgoing, _send_c, SCRATCH_BYTES)
            if n <= 0:
                return
            pending.append(_send_view[0:n])
            if n < SCRATCH_BYTES:
                return

    def _write(self, data) -> None:
        """Encrypt all of `data` into `outgoing` (a memory BIO takes everything: one call)."""
        size = len(data)
        if not size:
            return
        n = _lib.SSL_write(self.ssl, data if type(data) is bytes else _ffi.from_buffer(data), size)
        if n != size:
            e = _library.error(ssl=self.ssl)
            raise TlsError(f"TLS error: {e}", failure_reason(e)) from e

    def _encrypt(self, data) -> None:
        self._write(data)
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
        """Wait until every record the SSL made is with the kernel."""
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
        # the common case written out (one write, one read of the records, one send from the
        # scratch buffer): a response per request
        self._write(data)
        n = _lib.BIO_read(self.outgoing, _send_c, SCRATCH_BYTES)
        if n <= 0:
            return None
        if n == SCRATCH_BYTES:  # more records than one scratch buffer holds: queue them all, in order
            self._pending.append(_send_view[0:n])
            self._queue_outgoing()
            return None if self._send_pending_nowait() else _EMPTY
        try:
            sent = self.sock.send(_send_memory[:n])
        except BlockingIOError:
            sent = 0
        if sent < n:
            self._pending.append(_send_view[sent:n])
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

    def _send_close_notify(self) -> None:
        self._close_notify_sent = True
        # 0: ours is written; the peer's is not awaited (as Envoy)
        if _lib.SSL_shutdown(self.ssl) < 0:
            _lib.ERR_clear_error()
        self._queue_outgoing()

    def shutdown_write(self) -> None:
        """Send close_notify, then end the TCP write side once the queued records are out."""
        if self.closed:
            return
        if self._handshake_done and not self._close_notify_sent:
            self._send_close_notify()
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
            self._send_close_notify()
            try:
                self._send_pending_nowait()
            except OSError:
                pass  # the peer is gone already
        super().close()


def _set_server_hostname(pointer, name: str, check: bool) -> None:
    """A client's SNI (not for an IP address, RFC 6066 3) and, when `check`, the name or address the
    server's certificate must carry (the stdlib's rules: no partial wildcards)."""
    lib = _lib
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is None:
        lib.SSL_set_tlsext_host_name(pointer, name.encode("idna"))
    if not check:
        return
    parameters = lib.SSL_get0_param(pointer)
    if address is not None:
        packed = address.packed
        done = lib.X509_VERIFY_PARAM_set1_ip(parameters, packed, len(packed))
    else:
        lib.X509_VERIFY_PARAM_set_hostflags(parameters, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        encoded = name.encode("idna")
        done = lib.X509_VERIFY_PARAM_set1_host(parameters, encoded, len(encoded))
    if done != 1:  # unchecked, any certificate of the trusted CAs would pass
        raise TlsError(f"TLS error: cannot check the server's name {name!r}", "connection_error")
