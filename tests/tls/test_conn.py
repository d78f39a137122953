"""TlsConn over real TCP sockets on 127.0.0.1: handshake, ALPN, SNI, the Conn interface both ways,
concurrent reader and writer, errors and timeouts; the client side against the stdlib's TLS server."""

from __future__ import annotations

import math
import socket
import ssl
import subprocess
import threading
import time
from contextlib import asynccontextmanager

import pytest
import trio

from proxy.l7.reactor import Reactor
from proxy.l7.timeouts import TimeoutSweeper
from proxy.tls.conn import HandshakeTimeout, TlsConn, TlsError, TlsHandshakeError
from proxy.tls.context import ProtocolVersions, client_context, server_context
from proxy.tls.openssl import OpenSslError
from tests.tls.certs import tcp_pair, write_cert


def _pair(server_files, *, reactor=None, server_name="example.com", alpn=("h2", "http/1.1")):
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True,
                     reactor=reactor)
    client = TlsConn(client_sock, client_context(ca_file=server_files.ca, alpn=alpn), server_side=False,
                     server_hostname=server_name, reactor=reactor)
    return client, server


async def _handshake(client: TlsConn, server: TlsConn) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake, 5.0)
        nursery.start_soon(client.handshake, 5.0)


async def _read_exactly(conn: TlsConn, size: int) -> bytes:
    while conn.buffered < size:
        if await conn.fill() == 0:
            break
    return bytes(conn.consume(min(size, conn.buffered)))


async def test_handshake_alpn_sni_and_bytes_both_ways(server_files):
    client, server = _pair(server_files)
    await _handshake(client, server)
    assert server.alpn_protocol == client.alpn_protocol == "h2"
    assert server.server_name == "example.com"
    assert client.version in ("TLSv1.3", "TLSv1.2")
    assert client.peer_certificate()["subjectAltName"][0] == ("DNS", "example.com")

    await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert await _read_exactly(server, 27) == b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    rest = server.send_nowait(b"HTTP/1.1 200 OK\r\n\r\n")
    if rest is not None:
        await server.send_all(rest)
    assert await _read_exactly(client, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    rest = server.send_many_nowait([b"ab", memoryview(b"cd")])
    if rest is not None:
        await server.send_many(rest)
    await server.send_many([b"ef", b"g" * 100_000])
    assert await _read_exactly(client, 100_006) == b"abcdef" + b"g" * 100_000

    server.shutdown_write()  # close_notify then FIN: the client reads EOF
    assert await client.fill() == 0
    client.close()
    server.close()


async def test_a_tls13_server_sends_its_session_tickets_with_its_first_write(server_files):
    """What a TLS 1.3 server makes after the client's Finished (its session tickets) is not sent on
    its own: it leaves with the first write, one send for both; the client still gets it in order."""
    client, server = _pair(server_files)
    await _handshake(client, server)
    assert server.version == "TLSv1.3"
    with pytest.raises(BlockingIOError):
        client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    await server.send_all(b"x")
    assert await _read_exactly(client, 1) == b"x"
    client.close()
    server.close()


async def test_a_tls12_server_sends_its_finished_at_once(server_files):
    """In TLS 1.2 the server's last flight (its Finished) completes the client's handshake: sent at once."""
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key,
                                                 versions=ProtocolVersions("TLSV1_2", "TLSV1_2")), server_side=True)
    client = TlsConn(client_sock, client_context(ca_file=server_files.ca), server_side=False,
                     server_hostname="example.com")
    await _handshake(client, server)
    assert client.version == server.version == "TLSv1.2"
    await client.send_all(b"y")
    assert await _read_exactly(server, 1) == b"y"
    client.close()
    server.close()


async def test_http11_only_client_gets_http11(server_files):
    client, server = _pair(server_files, alpn=("http/1.1",))
    await _handshake(client, server)
    assert server.alpn_protocol == "http/1.1"
    client.close()
    server.close()


@pytest.mark.parametrize("batching", [False, True], ids=["direct", "batching"])
async def test_concurrent_reader_and_writer_on_the_reactor(server_files, batching):
    """HTTP/2's shape: one task writes megabytes while another reads, on the reactor in either mode
    (direct: Trio's own waits; batching: the edge-triggered set); every byte arrives once and in
    order, both ways."""
    reactor = Reactor(probe_s=0.0, min_batch=0.0) if batching else Reactor(probe_s=math.inf)
    size = 3_000_000
    payload = bytes(range(256)) * (size // 256)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        client, server = _pair(server_files, reactor=reactor)
        await _handshake(client, server)

        received = {}

        async def write(conn):
            view = memoryview(payload)
            for start in range(0, len(view), 70_000):
                rest = conn.send_nowait(view[start:start + 70_000])
                if rest is not None:
                    await conn.send_all(rest)

        async def read(conn, key):
            received[key] = await _read_exactly(conn, len(payload))

        async with trio.open_nursery() as io:
            io.start_soon(write, client)
            io.start_soon(write, server)
            io.start_soon(read, client, "client")
            io.start_soon(read, server, "server")
        assert received["client"] == payload and received["server"] == payload
        assert reactor.batching is batching
        client.close()
        server.close()
        nursery.cancel_scope.cancel()


async def test_plaintext_http_to_a_tls_server_fails_the_handshake(server_files):
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True)
    client_sock.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
    with pytest.raises(TlsHandshakeError) as caught:
        await server.handshake(5.0)
    assert caught.value.reason == "not_tls"
    assert isinstance(caught.value.__cause__, OpenSslError)  # the library's own reason kept as the cause
    assert caught.value.__cause__.reason == "HTTP_REQUEST"
    server.close()
    client_sock.close()


@pytest.mark.parametrize("first_bytes", [b"SSH-2.0-OpenSSH_9.2\r\n", b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
                                         b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\0" * 64])
async def test_other_protocols_to_a_tls_server_are_counted_as_not_tls(server_files, first_bytes):
    """Not a version problem: bytes that are no TLS record at all (a banner, a proxy's CONNECT, the
    h2c preface, zeros)."""
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True)
    client_sock.sendall(first_bytes)
    with pytest.raises(TlsHandshakeError) as caught:
        await server.handshake(5.0)
    assert caught.value.reason == "not_tls", caught.value.__cause__
    server.close()
    client_sock.close()


async def test_a_session_made_on_one_server_never_resumes_on_another(ca, tmp_path):
    """With tickets on, a session of a SIMPLE server's context offered to a MUTUAL server's (the SNI
    callback moving the connection there, as on a port with several servers) is not resumed: each
    server context's session id context hashes what it presents and whom it trusts, so the MUTUAL
    server asks for the client certificate, and a client without one is refused."""
    server_files = write_cert(ca, tmp_path, "ab", "a.example.com", "b.example.com")
    simple = server_context(server_files.cert, server_files.key)
    mutual = server_context(server_files.cert, server_files.key, ca_file=server_files.ca,
                            require_client_certificate=True)
    for context in (simple, mutual):
        context.set_server_name_handler(lambda name: mutual if name == "b.example.com" else simple)
    client = client_context(ca_file=server_files.ca)  # no client certificate

    async def connect(name: str, session=None) -> tuple[bool, bool]:
        """(handshake completed on both sides, resumed)"""
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, simple, server_side=True)  # every connection starts on the first context
        peer = TlsConn(client_sock, client, server_side=False, server_hostname=name, session=session)
        results = {}

        async def serve():
            try:
                await server.handshake(5.0)
                await server.send_all(b"x")
                results["server"] = server.session_reused
            except (TlsError, OSError):
                results["server"] = None

        async def call():
            try:
                await peer.handshake(5.0)
                peer.session_key = name
                results["client"] = await peer.fill() > 0
            except (TlsError, OSError):
                results["client"] = None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(call)
        server.close()
        peer.close()
        return results["server"] is not None and bool(results["client"]), bool(results["server"])

    assert await connect("a.example.com") == (True, False)
    session = client.sessions.get("a.example.com")
    assert session is not None
    assert await connect("a.example.com", session) == (True, True)  # the same server resumes it
    assert await connect("b.example.com", session) == (False, False)  # the MUTUAL server: refused


async def test_silent_peer_times_out(server_files):
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True)
    with pytest.raises(HandshakeTimeout):
        await server.handshake(0.2)
    server.close()
    client_sock.close()


async def test_peer_closing_during_handshake(server_files):
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True)
    client_sock.close()
    with pytest.raises(TlsHandshakeError) as caught:
        await server.handshake(5.0)
    assert caught.value.reason == "connection_closed"
    server.close()


async def test_a_client_hello_arriving_late_and_in_pieces(server_files):
    # the server's first step waits for the ClientHello; then each piece is fed to the handshake
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key, alpn=("http/1.1",)),
                     server_side=True)
    tls_in, tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=server_files.ca).wrap_bio(tls_in, tls_out, server_hostname="example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client_done = []

    def client(hello: bytes) -> None:
        time.sleep(0.1)
        for i in range(0, len(hello), 50):
            client_sock.sendall(hello[i:i + 50])
            time.sleep(0.01)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if tls_out.pending:
                    client_sock.sendall(tls_out.read())
                tls_in.write(client_sock.recv(65536))
        client_sock.sendall(tls_out.read())
        client_done.append(tls.version())

    thread = threading.Thread(target=client, args=(tls_out.read(),), daemon=True)
    thread.start()
    await server.handshake(5.0)
    thread.join(5)
    assert client_done == [server.version]
    assert server.server_name == "example.com"
    server.close()
    client_sock.close()


def _stdlib_tls_server(context: ssl.SSLContext) -> tuple[socket.socket, threading.Thread, list]:
    """A blocking stdlib TLS server on 127.0.0.1 answering one request with its ALPN and SNI."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def serve():
        raw, _ = listener.accept()
        sni = []
        context.sni_callback = lambda obj, name, ctx: sni.append(name)
        try:
            with context.wrap_socket(raw, server_side=True) as tls:
                data = tls.recv(100)
                seen.append((data, tls.selected_alpn_protocol(), sni))
                tls.sendall(b"pong")
        except (ssl.SSLError, OSError) as e:
            seen.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, seen


async def test_client_against_the_stdlib_server_verifies_and_sends_sni(server_files):
    stdlib = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib.load_cert_chain(server_files.cert, server_files.key)
    stdlib.set_alpn_protocols(["http/1.1"])
    listener, thread, seen = _stdlib_tls_server(stdlib)
    sock = socket.create_connection(listener.getsockname())
    client = TlsConn(sock, client_context(ca_file=server_files.ca), server_side=False, server_hostname="example.com")
    await client.handshake(5.0)
    assert client.alpn_protocol == "http/1.1"
    await client.send_all(b"ping")
    assert await _read_exactly(client, 4) == b"pong"
    client.close()
    await trio.to_thread.run_sync(thread.join, 5)
    listener.close()
    assert seen == [(b"ping", "http/1.1", ["example.com"])]


async def test_client_refuses_a_certificate_for_another_name(server_files):
    stdlib = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib.load_cert_chain(server_files.cert, server_files.key)
    listener, thread, _ = _stdlib_tls_server(stdlib)
    sock = socket.create_connection(listener.getsockname())
    client = TlsConn(sock, client_context(ca_file=server_files.ca), server_side=False, server_hostname="other.test")
    with pytest.raises(TlsHandshakeError) as caught:
        await client.handshake(5.0)
    assert caught.value.reason == "fail_verify_error"
    assert caught.value.__cause__.verify_message == "hostname mismatch"
    client.close()
    await trio.to_thread.run_sync(thread.join, 5)
    listener.close()


async def test_client_refuses_an_untrusted_server(server_files, tmp_path):
    import trustme

    (tmp_path / "other").mkdir()
    other = write_cert(trustme.CA(), tmp_path / "other", "other", "example.com")
    stdlib = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib.load_cert_chain(other.cert, other.key)
    listener, thread, _ = _stdlib_tls_server(stdlib)
    sock = socket.create_connection(listener.getsockname())
    client = TlsConn(sock, client_context(ca_file=server_files.ca), server_side=False, server_hostname="example.com")
    with pytest.raises(TlsHandshakeError) as caught:
        await client.handshake(5.0)
    assert caught.value.reason == "fail_verify_error"
    client.close()
    await trio.to_thread.run_sync(thread.join, 5)
    listener.close()


async def test_mutual_tls_client_certificate(ca, server_files, tmp_path):
    client_files = write_cert(ca, tmp_path, "client", "client.example.com")
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key, ca_file=server_files.ca,
                                                 require_client_certificate=True), server_side=True)
    client = TlsConn(client_sock, client_context(ca_file=server_files.ca, cert_file=client_files.cert,
                                                 key_file=client_files.key),
                     server_side=False, server_hostname="example.com")
    await _handshake(client, server)
    await client.send_all(b"hi")
    assert await _read_exactly(server, 2) == b"hi"
    assert ("DNS", "client.example.com") in server.peer_certificate()["subjectAltName"]
    client.close()
    server.close()


async def test_the_certificate_chain_sent_is_the_certificate_files(ca, server_files, tmp_path):
    """A leaf-only certificate file is sent as it is (as Envoy sends it): OpenSSL does not complete it
    from the trust store that verifies clients (the CA would be added, its signatures checked on every
    handshake), as `openssl s_client -showcerts` sees it."""
    client_files = write_cert(ca, tmp_path, "client", "client.example.com")
    context = server_context(server_files.cert, server_files.key, ca_file=server_files.ca,
                             require_client_certificate=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def client():
        return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts",
                               "-servername", "example.com", "-cert", client_files.cert, "-key", client_files.key,
                               "-CAfile", server_files.ca], input=b"", capture_output=True, timeout=20)

    async with trio.open_nursery() as nursery:
        async def serve():
            sock, _ = await trio.to_thread.run_sync(listener.accept)
            server = TlsConn(sock, context, server_side=True)
            await server.handshake(10.0)
            assert ("DNS", "client.example.com") in server.peer_certificate()["subjectAltName"]
            server.close()

        nursery.start_soon(serve)
        shown = await trio.to_thread.run_sync(client)
    listener.close()
    assert b"Verify return code: 0 (ok)" in shown.stdout, shown.stdout[-2000:]
    assert shown.stdout.count(b"-----BEGIN CERTIFICATE-----") == 1, shown.stdout.decode(errors="replace")


async def test_a_mutual_tls_client_resumes_its_session(ca, server_files, tmp_path):
    """A gateway server context (MUTUAL: clients verified) lets a client resume with its ticket (a
    server context without a session id context would refuse it), and the resumed connection still
    knows the client's certificate."""
    client_files = write_cert(ca, tmp_path, "client", "client.example.com")
    context = server_context(server_files.cert, server_files.key, ca_file=server_files.ca,
                             require_client_certificate=True)
    stdlib = ssl.create_default_context(cafile=server_files.ca)
    stdlib.load_cert_chain(client_files.cert, client_files.key)
    session = None
    for attempt in range(2):
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, context, server_side=True)

        def client(sock=client_sock, session=session):
            with stdlib.wrap_socket(sock, server_hostname="example.com", session=session) as tls:
                assert tls.recv(1) == b"x"  # the tickets come before the byte
                return tls.session_reused, tls.session

        async with trio.open_nursery() as nursery:
            async def serve():
                await server.handshake(5.0)
                await server.send_all(b"x")

            nursery.start_soon(serve)
            reused, session = await trio.to_thread.run_sync(client)
        assert ("DNS", "client.example.com") in server.peer_certificate()["subjectAltName"]
        assert reused == (attempt == 1)
        server.close()


async def test_a_client_keeps_the_session_of_its_first_read_and_offers_it(server_files):
    """Client side (proxy/tls/sessions.py): a connection marked with a key keeps its session when it
    first reads plaintext (the server's tickets came before it); the next connection offered that
    session resumes, and keeps the newer session its own ticket brought; one never marked (its
    checks not passed) keeps nothing. A context keeps sessions for `limit` servers, oldest dropped."""
    context = client_context(ca_file=server_files.ca)
    server_side = server_context(server_files.cert, server_files.key)
    ffi = context.library.ffi

    async def connect(key, mark: bool) -> bool:
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, server_side, server_side=True)
        client = TlsConn(client_sock, context, server_side=False, server_hostname="example.com",
                         session=context.sessions.get(key))
        await _handshake(client, server)
        if mark:
            client.session_key = key
        await server.send_all(b"x")
        assert await _read_exactly(client, 1) == b"x"
        reused = client.session_reused
        assert server.session_reused == reused
        client.close()
        server.close()
        return reused

    assert await connect("a", mark=False) is False
    assert len(context.sessions) == 0  # never marked: nothing kept
    assert await connect("a", mark=True) is False
    first = context.sessions.get("a")
    assert first is not None
    assert await connect("a", mark=True) is True
    address = ffi.cast("uintptr_t", first)
    assert ffi.cast("uintptr_t", context.sessions.get("a")) != address  # the resumed connection's own ticket
    del first
    assert await connect("b", mark=False) is False  # another server's key: nothing to offer

    context.sessions.limit = 2
    for key in ("b", "c"):
        assert await connect(key, mark=True) is False
    assert len(context.sessions) == 2 and context.sessions.get("a") is None  # the oldest went
    assert await connect("c", mark=True) is True


async def test_peek_closed_on_an_idle_client(server_files):
    client, server = _pair(server_files)
    await _handshake(client, server)
    await server.send_all(b"x")
    await _read_exactly(client, 1)
    assert not client.peek_closed()  # a TLS 1.3 session ticket alone leaves it usable
    server.close()  # close_notify + FIN
    await trio.sleep(0.05)
    assert client.peek_closed()
    client.close()


async def test_mutual_tls_peer_principal_is_the_spiffe_id(tmp_path):
    """The server side reads the client's workload identity from its certificate's URI SAN, without
    `spiffe://`, as Istio writes principals; a certificate without one gives None."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controlplane.ca import CertificateAuthority, server_names
    from cryptography import x509

    authority = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    (tmp_path / "root.pem").write_bytes(authority.trust_bundle_pem)

    def leaf(name: str, names) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = authority.issue_for_key(key.public_key(), names, 3600)
        cert, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert.write_bytes(issued.chain_pem)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert), str(key_file)

    server_cert, server_key = leaf("server", server_names(["example.com"]))
    root = str(tmp_path / "root.pem")
    for names, expected in (([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/buyer")],
                             "cluster.local/ns/shop/sa/buyer"),
                            (server_names(["client.example.com"]), None)):
        client_cert, client_key = leaf("client", names)
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, server_context(server_cert, server_key, ca_file=root,
                                                     require_client_certificate=True), server_side=True)
        client = TlsConn(client_sock, client_context(ca_file=root, cert_file=client_cert, key_file=client_key),
                         server_side=False, server_hostname="example.com")
        assert server.peer_principal() is None  # nothing before the handshake
        await _handshake(client, server)
        assert server.peer_principal() == expected
        assert client.peer_principal() is None  # the server's certificate names a host, not a workload
        client.close()
        server.close()


async def test_a_client_that_checks_hostnames_needs_a_name_to_check(server_files) -> None:
    """As the stdlib refuses it: with no name, the check would let any certificate of the CA pass."""
    reactor, sweeper = Reactor(), TimeoutSweeper(0.2)
    client_sock, server_sock = tcp_pair()
    try:
        with pytest.raises(TlsError, match="name to check is missing"):
            TlsConn(client_sock, client_context(ca_file=server_files.ca), server_side=False, reactor=reactor,
                    sweeper=sweeper)
        # the half-made connection undid its registrations and closed its socket
        assert not sweeper.watched
        assert client_sock.fileno() == -1
        other_sock, other_server_sock = tcp_pair()
        TlsConn(other_sock, client_context(ca_file=server_files.ca, check_hostname=False), server_side=False).close()
        other_server_sock.close()
    finally:
        client_sock.close()
        server_sock.close()


async def _wait_for_ciphertext(sock: socket.socket, size: int) -> None:
    """Until at least `size` bytes wait unread in the socket (so one receive takes them together)."""
    with trio.fail_after(5):
        while len(sock.recv(1 << 20, socket.MSG_PEEK)) < size:
            await trio.sleep(0.01)


async def test_full_records_already_received_are_decrypted_in_one_fill(server_files):
    """A peer streaming full 16 KiB records: one fill hands on every whole record one receive
    brought (one send onward, not one per record), then the peer's close_notify ends the stream."""
    client, server = _pair(server_files)
    await _handshake(client, server)
    payload = bytes(range(256)) * (3 * 16384 // 256)
    await client.send_all(payload)  # three full records
    client.shutdown_write()  # close_notify + FIN behind them
    await _wait_for_ciphertext(server.sock, len(payload) + 3 * 22 + 24)
    assert await server.fill() == len(payload)
    assert bytes(server.take_buffered()) == payload
    assert await server.fill() == 0
    client.close()
    server.close()


async def test_a_bad_record_behind_full_records_fails_after_their_plaintext(server_files):
    """The records before a malformed one are handed on intact (the alert the failure makes, and the
    TLS 1.3 session tickets the server still holds, must not land on their plaintext); the next fill
    raises the TLS error."""
    client, server = _pair(server_files)
    await _handshake(client, server)
    payload = bytes(range(256)) * (2 * 16384 // 256)
    await client.send_all(payload)
    client.sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data that fails to decrypt
    await _wait_for_ciphertext(server.sock, len(payload) + 2 * 22 + 37)
    assert await server.fill() == len(payload)
    assert bytes(server.take_buffered()) == payload
    with pytest.raises(TlsError):
        await server.fill()
    client.close()
    server.close()


async def test_a_fatal_alert_behind_full_records_ends_the_upload_after_their_plaintext(server_files):
    """A TLS 1.3 upload cut by the peer's fatal alert: the whole records before the alert are handed
    on as they were sent, then the next fill raises the alert as a TLS error."""
    client, server = _pair(server_files)
    await _handshake(client, server)
    assert server.version == "TLSv1.3"
    payload = bytes(range(256)) * (2 * 16384 // 256)
    await client.send_all(payload)
    # a record the client cannot decrypt makes it send its fatal alert (bad_record_mac) behind the upload
    server.sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    with pytest.raises(TlsError):
        await client.fill()
    await _wait_for_ciphertext(server.sock, len(payload) + 2 * 22 + 24)
    assert await server.fill() == len(payload)
    assert bytes(server.take_buffered()) == payload
    with pytest.raises(TlsError) as caught:
        await server.fill()
    assert caught.value.reason == "alert_received"
    client.close()
    server.close()


async def test_tls13_suite_follows_envoys_choice_with_a_client_in_openssl_default_order(server_files):
    """The stdlib's client offers TLS 1.3's suites in OpenSSL's order (AES-256-GCM-SHA384 first).
    BoringSSL, as in Envoy, takes the client's order among the AES-GCM suites (equal where the CPU
    has AES instructions); on cryptography's OpenSSL the server's order picks AES-128-GCM."""
    client_sock, server_sock = tcp_pair()
    server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True)
    stdlib = ssl.create_default_context(cafile=server_files.ca)
    assert [c["name"] for c in stdlib.get_ciphers()][0] == "TLS_AES_256_GCM_SHA384"

    def client():
        with stdlib.wrap_socket(client_sock, server_hostname="example.com") as tls:
            return tls.cipher()[0], tls.version()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake, 5.0)
        negotiated, version = await trio.to_thread.run_sync(client)
    expected = "TLS_AES_256_GCM_SHA384" if server.context.library.boringssl else "TLS_AES_128_GCM_SHA256"
    assert (negotiated, version) == (expected, "TLSv1.3")
    assert server.cipher == expected
    server.close()


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
async def test_each_tls13_suite_is_accepted_alone(server_files, suite):
    """A client offering only one of TLS 1.3's three suites (openssl s_client) gets it."""
    server_socket = socket.create_server(("127.0.0.1", 0))
    port = server_socket.getsockname()[1]

    def client():
        return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "example.com",
                               "-CAfile", server_files.ca, "-tls1_3", "-ciphersuites", suite, "-brief"],
                              input="", capture_output=True, text=True, timeout=20)

    async with trio.open_nursery() as nursery:
        shown = nursery.start_soon
        result = {}

        async def run_client():
            result["client"] = await trio.to_thread.run_sync(client)

        shown(run_client)
        await trio.lowlevel.wait_readable(server_socket)
        sock, _ = server_socket.accept()
        server = TlsConn(sock, server_context(server_files.cert, server_files.key), server_side=True)
        await server.handshake(10)
        assert server.cipher == suite
        server.close()
    server_socket.close()
    assert f"Ciphersuite: {suite}" in result["client"].stdout + result["client"].stderr


@asynccontextmanager
async def _accepted_on_the_data_path(server_files):
    """(reactor, client socket, server TlsConn): an accepted connection as the data path makes it, on
    a running reactor and a 0.2 s timeout sweeper; both stop when the block ends."""
    reactor, sweeper = Reactor(), TimeoutSweeper(0.2)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        sweeper.ensure_running(nursery)
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, server_context(server_files.cert, server_files.key), server_side=True,
                         reactor=reactor, sweeper=sweeper)
        yield reactor, client_sock, server
        nursery.cancel_scope.cancel()


async def test_a_silent_peer_times_out_through_the_sweeper(server_files):
    """An accepted connection with a sweeper: the handshake's deadline is its io_deadline, which the
    sweeper enforces (no cancel scope); the wait ends with HandshakeTimeout and the deadline is cleared."""
    async with _accepted_on_the_data_path(server_files) as (_, client_sock, server):
        started = trio.current_time()
        with trio.fail_after(5):  # the sweeper, not this scope, must end the wait
            with pytest.raises(HandshakeTimeout):
                await server.handshake(0.2)
        assert 0.2 <= trio.current_time() - started < 2
        assert server.timed_out  # the sweeper expired it (a cancel scope would leave this False)
        assert server.io_deadline == math.inf
        server.close()
        client_sock.close()


async def test_a_handshake_through_the_sweeper_completes_and_clears_its_deadline(server_files):
    async with _accepted_on_the_data_path(server_files) as (reactor, client_sock, server):
        client = TlsConn(client_sock, client_context(ca_file=server_files.ca), server_side=False,
                         server_hostname="example.com", reactor=reactor)
        await _handshake(client, server)
        assert server.io_deadline == math.inf and not server.timed_out
        await trio.sleep(0.5)  # sweeps pass: the finished handshake's deadline must not expire the connection
        await client.send_all(b"ping")
        assert await _read_exactly(server, 4) == b"ping"
        client.close()
        server.close()

