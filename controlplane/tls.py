"""TLS for control-plane streams: the contexts of both ends, the handshake on the non-blocking
sockets `FramedStream` drives, and the peer's SPIFFE ID.

Theory of operation. A stream stays one plain non-blocking socket that `FramedStream` sends on
without a scheduler trip when the kernel takes the bytes; with TLS that socket is an `ssl.SSLSocket`
whose WantRead/WantWrite errors play the part of EAGAIN. The handshake runs here, before the first
frame. The server asks for (but does not require) a client certificate: a proxy renewing its identity
shows its current one, a proxy with a bootstrap token or a CLI with an admin token has none. A
client certificate that is shown must verify against the trust bundle, or the handshake fails.

A client certificate the control plane no longer trusts (its root was dropped while the proxy was
away) must not lock out a proxy that also has a bootstrap token: when the server refuses the
certificate, `connect` tries once more without one, and the Hello's token proves the identity. With
TLS 1.2 the refusal ends the handshake; with TLS 1.3 the server judges the client certificate after
the client's side of the handshake is done, so the client waits for the server's first records, its
verdict: session tickets (accepted) or an alert (refused). The control plane sends nothing else
before the client's first frame.

A plaintext peer on the TLS port gets a plaintext `Error` frame (TLS_REQUIRED) instead of a handshake
failure it could not read, then the connection closes: the first byte of a TLS stream is 0x16.
"""

from __future__ import annotations

import re
import socket
import ssl

import trio
from cryptography import x509
from trio.lowlevel import wait_readable, wait_writable

from controlplane.wire import Error, encode_frame
from proxy.identity.spiffe import InvalidSpiffeId, SpiffeId
from proxy.identity.workload import WorkloadIdentity, load_certificate_chain

TLS_HANDSHAKE_RECORD = 0x16
PLAINTEXT_LINGER_S = 1.0  # how long a refused plaintext peer gets to read its Error before the close
PLAINTEXT_DRAIN_BYTES = 1 << 16
CONTROLPLANE_SERVICE_ACCOUNT = ("istio-system", "istiod")  # the control plane's own SPIFFE ID, as istiod's


class TlsFailed(Exception):
    """The handshake failed; the message says why (the ssl module's reason)."""


class CertificateRefused(TlsFailed):
    """The server refused the client certificate shown (its alert's reason)."""


# the alerts a server sends about the client's certificate (OpenSSL's reasons)
_CERTIFICATE_ALERT = re.compile(r"ALERT_(UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_\w+|UNSUPPORTED_CERTIFICATE)")


class CertificateShowingContext(ssl.SSLContext):
    """A client context that shows a certificate, with the same context without one to fall back to
    when the server refuses it."""

    without_certificate: ssl.SSLContext


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(chain_pem: bytes, key_pem: bytes, trust_bundle_pem: bytes) -> ssl.SSLContext:
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    load_certificate_chain(context, chain_pem, key_pem)
    context.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    # the session ticket sent after a TLS 1.3 handshake tells the client its certificate was accepted
    context.num_tickets = 1
    return context


def client_context(trust_bundle_pem: bytes, identity: WorkloadIdentity | None = None) -> ssl.SSLContext:
    """Verifies the control plane's certificate (and host name) with the roots given, and with the
    trust bundle of `identity`, which the control plane sent over a verified stream: after a root
    rotation the control plane's certificate comes from the new root, which the configured file may
    not hold. Presents `identity` as the client certificate when there is one (a
    `CertificateShowingContext`, which `connect` falls back from to none if the server refuses it)."""
    if identity is None:
        return _verifying(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), trust_bundle_pem, None)
    context = _verifying(CertificateShowingContext(ssl.PROTOCOL_TLS_CLIENT), trust_bundle_pem, identity)
    load_certificate_chain(context, identity.certificate_chain_pem, identity.private_key_pem)
    context.without_certificate = _verifying(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), trust_bundle_pem, identity)
    return context


def _verifying(context: ssl.SSLContext, trust_bundle_pem: bytes, identity: WorkloadIdentity | None) -> ssl.SSLContext:
    context = _hardened(context)  # a client context: check_hostname and CERT_REQUIRED
    context.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    if identity is not None:
        context.load_verify_locations(cadata=identity.trust_bundle_pem.decode("ascii"))
    return context


async def _drive_handshake(sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await wait_readable(sock)
        except ssl.SSLWantWriteError:
            await wait_writable(sock)
        except ssl.SSLError as e:
            raise _failure(e) from e
        except OSError as e:
            raise TlsFailed(f"connection lost during the handshake: {e}") from e


def _failure(error: ssl.SSLError) -> TlsFailed:
    reason = error.reason or str(error)
    return CertificateRefused(reason) if _CERTIFICATE_ALERT.search(reason) else TlsFailed(reason)


async def _await_certificate_verdict(sock: ssl.SSLSocket) -> None:
    """TLS 1.3, a client certificate shown: returns once the server's session ticket arrived (it
    accepted the certificate); raises CertificateRefused on its alert."""
    while True:
        try:
            data = sock.recv(1)  # processes the records that came; returns application data only
        except ssl.SSLWantReadError:
            session = sock.session
            if session is not None and session.has_ticket:
                return
            await wait_readable(sock)
            continue
        except ssl.SSLWantWriteError:
            await wait_writable(sock)
            continue
        except ssl.SSLError as e:
            raise _failure(e) from e
        except OSError as e:
            raise TlsFailed(f"connection lost after the handshake: {e}") from e
        if not data:
            raise TlsFailed("the control plane closed the connection after the handshake")
        raise TlsFailed("the control plane spoke before the client's first frame")  # never: nothing to lose


async def _first_byte(sock: socket.socket) -> int | None:
    while True:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        except OSError:
            return None
        return data[0] if data else None


async def accept(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket | None:
    """Server side: the TLS socket, or None after answering a plaintext peer (or one that left)."""
    sock.setblocking(False)
    first = await _first_byte(sock)
    if first is None:
        return None
    if first != TLS_HANDSHAKE_RECORD:
        await _refuse_plaintext(sock)
        return None
    # the TLS socket takes the file descriptor over: from here on it is the one to close
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        await _drive_handshake(tls)
    except BaseException:  # a failed handshake, or the caller's timeout
        tls.close()
        raise
    return tls


async def _refuse_plaintext(sock: socket.socket) -> None:
    """Send the Error, end our side, and read what the peer sent until it closes (bounded): closing
    with its bytes unread would reset the connection, and the reset can discard the Error unread."""
    try:
        sock.send(encode_frame(Error(code="TLS_REQUIRED", message="this control plane serves TLS only: connect "
                                                                   "with its root certificate (--controlplane-ca)")))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    drained = 0
    with trio.move_on_after(PLAINTEXT_LINGER_S):
        while drained < PLAINTEXT_DRAIN_BYTES:
            try:
                data = sock.recv(PLAINTEXT_DRAIN_BYTES)
            except BlockingIOError:
                await wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            drained += len(data)


async def connect(host: str, port: int, context: ssl.SSLContext, *, server_name: str | None = None) -> ssl.SSLSocket:
    """Client side: a verified TLS socket to the control plane (server name: `server_name`, else `host`).
    A client certificate the server refuses is dropped: the connection is made again without one."""
    try:
        return await _connect_once(host, port, context, server_name)
    except CertificateRefused:
        if not isinstance(context, CertificateShowingContext):
            raise
        return await _connect_once(host, port, context.without_certificate, server_name)


async def _connect_once(host: str, port: int, context: ssl.SSLContext, server_name: str | None) -> ssl.SSLSocket:
    stream = await trio.open_tcp_stream(host, port)
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_side=False, do_handshake_on_connect=False,
                              server_hostname=server_name or host)
    try:
        await _drive_handshake(tls)
        if isinstance(context, CertificateShowingContext) and tls.version() == "TLSv1.3":
            await _await_certificate_verdict(tls)
    except BaseException:
        tls.close()
        raise
    return tls


def peer_identity(sock: socket.socket, trust_domain: str) -> SpiffeId | None:
    """The verified client certificate's SPIFFE ID in our trust domain, else None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    certificate = x509.load_der_x509_certificate(der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            identity = SpiffeId.parse(uri)
        except InvalidSpiffeId:
            continue
        if identity.trust_domain == trust_domain:
            return identity
    return None
