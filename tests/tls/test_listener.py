"""ListenerTls: which server a ClientHello's SNI picks, and certificate reloads from real files
(a good change is taken, a bad one keeps the last good context and is counted)."""

from __future__ import annotations

import shutil

from proxy.config.snapshot import CertificateFiles, Listener, RouteTable, ServerTls, Snapshot
from proxy.stats import Stats
from proxy.tls.certificates import certificates_report
from proxy.tls.listener import ListenerTls, TlsListeners
from tests.tls.certs import write_cert


def _server(files, *names: str, listener: str = "routes") -> ServerTls:
    return ServerTls(names, "SIMPLE", CertificateFiles(files.cert, files.key, origin="files"), listener=listener)


def test_sni_picks_exact_then_longest_suffix_then_catch_all(server_files):
    servers = (_server(server_files, "a.example.com"), _server(server_files, "*.example.com"),
               _server(server_files, "*.deep.example.com"), _server(server_files, "*"))
    runtime = ListenerTls("l", servers, Stats())
    assert runtime.pick("A.example.com.") == 0
    assert runtime.pick("x.example.com") == 1
    assert runtime.pick("x.deep.example.com") == 2
    assert runtime.pick("example.com") == 3  # "*.example.com" needs a label before the suffix
    assert runtime.pick(None) == 3  # no SNI: the catch-all server
    without_catch_all = ListenerTls("l", servers[:2], Stats())
    assert without_catch_all.pick(None) == 0  # else the first server
    assert without_catch_all.pick("other.test") is None  # refused: unrecognized_name


def test_only_a_listener_that_can_refuse_or_switch_has_an_sni_callback(server_files):
    """One server taking every name (`*`) has nothing to decide per ClientHello: no callback into
    Python during its handshakes; one named server refuses other names, several servers switch."""
    assert ListenerTls("l", (_server(server_files, "*"),), Stats()).initial_context().on_server_name is None
    named = ListenerTls("l", (_server(server_files, "a.example.com"),), Stats())
    assert named.initial_context().on_server_name is not None
    several = ListenerTls("l", (_server(server_files, "*"), _server(server_files, "a.example.com")), Stats())
    assert all(e.context.on_server_name is not None for e in several.servers)


def test_reload_takes_a_good_change_and_keeps_the_last_good_context(ca, tmp_path, server_files):
    stats = Stats()
    (tmp_path / "live").mkdir()
    live = write_cert(ca, tmp_path / "live", "live", "a.example.com")
    runtime = ListenerTls("l", (_server(live, "a.example.com"),), stats)
    first = runtime.initial_context()
    runtime.maybe_reload()
    assert runtime.initial_context() is first  # nothing changed: nothing rebuilt

    (tmp_path / "next").mkdir()
    replacement = write_cert(ca, tmp_path / "next", "next", "a.example.com")
    shutil.copy(replacement.cert, live.cert)
    shutil.copy(replacement.key, live.key)
    runtime.maybe_reload()
    second = runtime.initial_context()
    assert second is not first
    ok = stats.counter("triomesh_tls_certificate_reload_total", certificate=live.cert, result="success")
    assert ok.value == 1

    shutil.copy(server_files.key, live.key)  # a key of another certificate
    runtime.maybe_reload()
    assert runtime.initial_context() is second
    failed = stats.counter("triomesh_tls_certificate_reload_total", certificate=live.cert, result="failure")
    assert failed.value == 1
    assert "does not match" in runtime.servers[0].last_error
    runtime.maybe_reload()  # the same bad files: not retried until they change again
    assert failed.value == 1

    listener = Listener("l", "127.0.0.1", 8443, "HTTPS", RouteTable({}, (), None),
                        tls_servers=(runtime.servers[0].server,))
    (entry,) = certificates_report([listener])["certificates"]
    assert "does not match" in entry["error"]
    assert entry["cert_chain"][0]["subject_alt_names"] == ["DNS:a.example.com"]


def test_runtime_kept_across_snapshots_while_servers_are_unchanged(server_files):
    servers = (_server(server_files, "a.example.com"),)
    listeners = TlsListeners(Stats())

    def snapshot(version: str, tls_servers) -> Snapshot:
        return Snapshot(version, (Listener("l", "127.0.0.1", 8443, "HTTPS", RouteTable({}, (), None), tls_servers=tls_servers),), {})

    first = listeners.for_listener(snapshot("1", servers), "l")
    assert listeners.for_listener(snapshot("2", servers), "l") is first
    # a new snapshot's equal servers (a config reload compiles them anew): the same runtime
    reloaded = (_server(server_files, "a.example.com"),)
    assert reloaded == servers and reloaded is not servers
    assert listeners.for_listener(snapshot("2b", reloaded), "l") is first
    assert listeners.for_listener(snapshot("2c", servers), "l") is first
    changed = listeners.for_listener(snapshot("3", (_server(server_files, "b.example.com"),)), "l")
    assert changed is not first
    assert listeners.for_listener(snapshot("3b", servers), "l") is not changed  # and back
    assert listeners.for_listener(snapshot("4", ()), "l") is None


async def test_watcher_makes_runtimes_for_the_current_listeners_and_reloads(ca, tmp_path, autojump_clock):
    """watch_certificates on the (mock) clock: a listener nobody connected to yet gets its runtime, and
    a changed file is reloaded without any traffic."""
    import trio

    from proxy.runtime import SnapshotHolder

    (tmp_path / "live").mkdir()
    live = write_cert(ca, tmp_path / "live", "live", "a.example.com")
    holder = SnapshotHolder()
    holder.swap(Snapshot("1", (Listener("l", "127.0.0.1", 8443, "HTTPS", RouteTable({}, (), None),
                                        tls_servers=(_server(live, "a.example.com"),)),), {}))
    stats = Stats()
    listeners = TlsListeners(stats)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listeners.watch_certificates, holder)
        await trio.sleep(1.5)
        runtime = listeners.for_listener(holder.current, "l")
        first = runtime.initial_context()
        shutil.copy(live.cert, tmp_path / "copy.crt")
        (tmp_path / "copy.crt").rename(live.cert)  # same content, new file: a reload all the same
        await trio.sleep(1.5)
        assert runtime.initial_context() is not first
        assert stats.counter("triomesh_tls_certificate_reload_total", certificate=live.cert, result="success").value == 1
        nursery.cancel_scope.cancel()


async def test_a_mutual_server_chosen_by_sni_requires_its_client_certificate(ca, tmp_path, server_files):
    """The connection starts on the default (SIMPLE) server's context; SNI moves it to the MUTUAL
    server's, whose client certificate requirement and CA then apply to that handshake."""
    import trio

    from proxy.tls.conn import TlsConn, TlsHandshakeError
    from proxy.tls.context import client_context
    from tests.tls.certs import tcp_pair

    mutual = ServerTls(("mtls.example.com",), "MUTUAL",
                       CertificateFiles(server_files.cert, server_files.key, server_files.ca, origin="files"),
                       listener="mtls")
    runtime = ListenerTls("l", (_server(server_files, "*"), mutual), Stats())
    client_files = write_cert(ca, tmp_path, "client", "client.example.com")

    async def handshake(server_name: str, **client_files_kw):
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, runtime.initial_context(), server_side=True)
        client = TlsConn(client_sock, client_context(ca_file=server_files.ca, check_hostname=False, **client_files_kw),
                         server_side=False, server_hostname=server_name)
        failure = None
        async with trio.open_nursery() as nursery:
            async def serve():
                nonlocal failure
                try:
                    await server.handshake(5.0)
                    await server.send_all(b"x")
                except TlsHandshakeError as e:
                    failure = e
                server.close()

            async def connect():
                try:
                    await client.handshake(5.0)
                    await client.fill()
                except OSError:
                    pass
                client.close()

            nursery.start_soon(serve)
            nursery.start_soon(connect)
        return server, failure

    server, failure = await handshake("mtls.example.com")
    assert failure is not None and failure.reason == "fail_verify_no_cert"
    server, failure = await handshake("mtls.example.com", cert_file=client_files.cert, key_file=client_files.key)
    assert failure is None
    assert runtime.server_for(server) is mutual
    assert ("DNS", "client.example.com") in server.peer_certificate()["subjectAltName"]
    server, failure = await handshake("example.com")  # the SIMPLE catch-all asks for no certificate
    assert failure is None and runtime.server_for(server).mode == "SIMPLE"


async def test_a_session_of_one_server_is_never_resumed_for_another(ca, tmp_path, server_files):
    """TLS resumption skips the client certificate: a session the SIMPLE default server made (no
    certificate asked) offered with the SNI of the port's MUTUAL server is refused, and a session of
    the MUTUAL server resumes there only. The client is the stdlib's, which offers a session as given."""
    import ssl
    import threading

    import trio

    from proxy.tls.conn import TlsConn, TlsHandshakeError
    from tests.tls.certs import tcp_pair

    mutual = ServerTls(("mtls.example.com",), "MUTUAL",
                       CertificateFiles(server_files.cert, server_files.key, server_files.ca, origin="files"),
                       listener="mtls")
    runtime = ListenerTls("l", (_server(server_files, "*"), mutual), Stats())
    client_files = write_cert(ca, tmp_path, "client", "client.example.com")
    anonymous = ssl.create_default_context(cafile=server_files.ca)
    anonymous.check_hostname = False
    with_certificate = ssl.create_default_context(cafile=server_files.ca)
    with_certificate.check_hostname = False
    with_certificate.load_cert_chain(client_files.cert, client_files.key)

    async def connect(client_context: ssl.SSLContext, server_name: str, session: ssl.SSLSession | None):
        """(the server's failure or None, the client's session, whether the client resumed)."""
        client_sock, server_sock = tcp_pair()
        seen: dict = {}

        def client() -> None:
            try:
                with client_context.wrap_socket(client_sock, server_hostname=server_name, session=session) as tls:
                    tls.recv(1)  # the server's byte: TLS 1.3 tickets arrive with it
                    seen.update(session=tls.session, reused=tls.session_reused)
            except (ssl.SSLError, OSError) as e:
                seen["error"] = e

        thread = threading.Thread(target=client)
        thread.start()
        server = TlsConn(server_sock, runtime.initial_context(), server_side=True)
        failure = None
        try:
            await server.handshake(5.0)
            await server.send_all(b"x")
            await trio.sleep(0.2)
        except TlsHandshakeError as e:
            failure = e
        finally:
            server.close()
            await trio.to_thread.run_sync(thread.join)
        return failure, seen.get("session"), seen.get("reused", False)

    failure, simple_session, reused = await connect(anonymous, "example.com", None)
    assert failure is None and not reused and simple_session is not None
    failure, _, reused = await connect(anonymous, "mtls.example.com", simple_session)
    assert failure is not None and not reused  # before the fix: resumed, MUTUAL without a certificate
    failure, mutual_session, _ = await connect(with_certificate, "mtls.example.com", None)
    assert failure is None and mutual_session is not None
    failure, _, reused = await connect(with_certificate, "example.com", mutual_session)
    assert failure is None and not reused  # offered to the SIMPLE server: a full handshake instead
    failure, _, _ = await connect(with_certificate, "mtls.example.com", mutual_session)
    assert failure is None  # its own server: resumed or not, the handshake succeeds


def test_an_istio_mutual_server_reloads_on_renewal_and_on_a_new_trust_bundle(tmp_path):
    """The workload certificate's serial and the trust bundle both make the fingerprint: a root
    rotation that only adds a root to the bundle (the serial unchanged) rebuilds the context too, so
    clients of the new root verify and old session tickets (the old context's keys) resume nothing."""
    from controlplane.ca import CertificateAuthority
    from proxy.identity.holder import IdentityHolder
    from proxy.tls.certificates import WORKLOAD_CERTIFICATE
    from tests.l4.test_mesh_mtls import issue

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    holder = IdentityHolder()
    holder.swap(issue(ca, "foo", "gateway"))
    server = ServerTls(("*",), "ISTIO_MUTUAL", CertificateFiles("", "", "", WORKLOAD_CERTIFICATE), listener="routes")
    runtime = ListenerTls("l", (server,), Stats(), holder)
    first = runtime.initial_context()
    runtime.maybe_reload()
    assert runtime.initial_context() is first

    other = CertificateAuthority.load_or_create(tmp_path / "other", "cluster.local")
    holder.swap(holder.current.with_trust_bundle(holder.current.trust_bundle_pem + other.trust_bundle_pem))
    runtime.maybe_reload()
    second = runtime.initial_context()
    assert second is not first

    holder.swap(issue(ca, "foo", "gateway"))  # renewal: a new serial
    runtime.maybe_reload()
    assert runtime.initial_context() is not second


async def test_a_server_of_a_proxy_of_many_workers_sends_no_tickets_to_resume(server_files):
    """TlsListeners(session_tickets=False), as a worker of a proxy of more than
    MAX_WORKERS_FOR_SESSION_TICKETS makes it: the server's tickets resume nothing (each worker has its
    own ticket keys); with them, a client's second connection resumes."""
    import ssl
    import threading

    import trio

    from proxy.tls.conn import TlsConn
    from tests.tls.certs import tcp_pair

    client_context = ssl.create_default_context(cafile=server_files.ca)

    async def resumed_second(runtime: ListenerTls) -> bool:
        session, reused = None, False
        for _ in range(2):
            client_sock, server_sock = tcp_pair()

            def client(sock=client_sock, offered=session) -> tuple:
                with client_context.wrap_socket(sock, server_hostname="example.com", session=offered) as tls:
                    assert tls.recv(1) == b"x"  # the tickets come before the byte
                    return tls.session, tls.session_reused

            server = TlsConn(server_sock, runtime.initial_context(), server_side=True)
            async with trio.open_nursery() as nursery:
                async def serve() -> None:
                    await server.handshake(5.0)
                    await server.send_all(b"x")

                nursery.start_soon(serve)
                session, reused = await trio.to_thread.run_sync(client)
            server.close()
        return reused

    servers = (_server(server_files, "*"),)
    assert await resumed_second(ListenerTls("l", servers, Stats())) is True
    assert await resumed_second(ListenerTls("l", servers, Stats(), session_tickets=False)) is False


async def test_each_server_of_a_port_keeps_its_own_protocol_versions(server_files):
    """OpenSSL settles the version with a connection's first context, before SNI picks the server:
    when the port's servers take different versions, a connection starts on the context of the
    server its ClientHello's SNI names (read first), so each server's versions hold, whichever is
    first; a client that goes down to a version the server takes gets it."""
    import trio

    from proxy.tls.conn import TlsConn, TlsHandshakeError
    from proxy.tls.context import TLS1_2, TLS1_3, ProtocolVersions, client_context
    from tests.tls.certs import tcp_pair

    def server(name: str, minimum: str = "TLS_AUTO", maximum: str = "TLS_AUTO") -> ServerTls:
        return ServerTls((name,), "SIMPLE", CertificateFiles(server_files.cert, server_files.key, origin="files"),
                         listener="routes", min_protocol_version=minimum, max_protocol_version=maximum)

    async def handshake(runtime: ListenerTls, server_name: str, client_maximum: str) -> int | str:
        """The version the handshake settled, or the server's stats reason for refusing it."""
        client_sock, server_sock = tcp_pair()
        client = TlsConn(client_sock, client_context(ca_file=server_files.ca, check_hostname=False,
                                                     versions=ProtocolVersions("TLS_AUTO", client_maximum)),
                         server_side=False, server_hostname=server_name)
        outcome: int | str = 0
        async with trio.open_nursery() as nursery:
            async def serve():
                nonlocal outcome
                context, client_hello, _ = await runtime.starting_context(server_sock)
                conn = TlsConn(server_sock, context, server_side=True, initial=client_hello)
                try:
                    await conn.handshake(5.0)
                    outcome = conn.protocol_version_number
                except TlsHandshakeError as e:
                    outcome = runtime.refusal(conn.server_name, conn.protocol_version_number) or e.reason
                conn.close()

            async def connect():
                try:
                    await client.handshake(5.0)
                except OSError:
                    pass
                client.close()

            nursery.start_soon(serve)
            nursery.start_soon(connect)
        return outcome

    # the first (default) server takes any version; later ones narrow theirs
    runtime = ListenerTls("l", (server("*"), server("new.example.com", minimum="TLSV1_3"),
                                server("old.example.com", maximum="TLSV1_2")), Stats())
    assert await handshake(runtime, "new.example.com", "TLSV1_2") == "unsupported_protocol"
    assert await handshake(runtime, "new.example.com", "TLSV1_3") == TLS1_3
    assert await handshake(runtime, "old.example.com", "TLSV1_3") == TLS1_2  # the client goes down to 1.2
    assert await handshake(runtime, "any.example.com", "TLSV1_2") == TLS1_2
    # the first server is the narrow one: a later server's wider range still holds, the first keeps its own
    runtime = ListenerTls("l", (server("*", minimum="TLSV1_3"), server("old.example.com", maximum="TLSV1_2")), Stats())
    assert await handshake(runtime, "old.example.com", "TLSV1_3") == TLS1_2
    assert await handshake(runtime, "any.example.com", "TLSV1_2") == "unsupported_protocol"
    assert await handshake(runtime, "any.example.com", "TLSV1_3") == TLS1_3
    assert runtime.pick_before_handshake
    # TLS_AUTO's maximum and TLSV1_3 are the same range: nothing to read first
    assert not ListenerTls("l", (server("*"), server("new.example.com", maximum="TLSV1_3")),
                           Stats()).pick_before_handshake
    # the same versions everywhere: nothing is read before the handshake
    assert not ListenerTls("l", (server("*"), server("new.example.com")), Stats()).pick_before_handshake


async def test_an_equal_preference_cipher_group_offers_each_of_its_suites(server_files):
    """Envoy's `[A|B]` in cipherSuites (which Istio passes on): each suite of the group is offered."""
    import trio

    from proxy.tls.conn import TlsConn
    from proxy.tls.context import ProtocolVersions, client_context
    from tests.tls.certs import tcp_pair

    group = "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]"
    runtime = ListenerTls("l", (ServerTls(("*",), "SIMPLE", CertificateFiles(server_files.cert, server_files.key,
                                                                              origin="files"),
                                          listener="routes", cipher_suites=(group,)),), Stats())
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        client_sock, server_sock = tcp_pair()
        server = TlsConn(server_sock, runtime.initial_context(), server_side=True)
        client = TlsConn(client_sock, client_context(ca_file=server_files.ca, check_hostname=False,
                                                     versions=ProtocolVersions("TLS_AUTO", "TLSV1_2"),
                                                     cipher_suites=(suite,)),
                         server_side=False, server_hostname="a.example.com")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handshake, 5.0)
            nursery.start_soon(client.handshake, 5.0)
        assert server.cipher == suite
        server.close()
        client.close()


async def test_the_sni_callback_holds_a_connection_started_elsewhere_to_its_servers_versions(server_files):
    """A connection that starts on the first context (as one whose ClientHello the listener could not
    read) is still refused a version its server does not take: by the SNI callback (alert 70,
    counted as unsupported_protocol). A failure before any ClientHello keeps its own reason."""
    import socket as socket_module

    import trio

    from proxy.tls.conn import TlsConn, TlsHandshakeError
    from proxy.tls.context import ProtocolVersions, client_context
    from tests.tls.certs import tcp_pair

    def server(name: str, minimum: str = "TLS_AUTO", maximum: str = "TLS_AUTO") -> ServerTls:
        return ServerTls((name,), "SIMPLE", CertificateFiles(server_files.cert, server_files.key, origin="files"),
                         listener="routes", min_protocol_version=minimum, max_protocol_version=maximum)

    runtime = ListenerTls("l", (server("*", maximum="TLSV1_2"), server("new.example.com", minimum="TLSV1_3")), Stats())

    async def refused(client_sock: socket_module.socket, server_sock: socket_module.socket, connect) -> str:
        conn = TlsConn(server_sock, runtime.initial_context(), server_side=True)
        reason = ""
        async with trio.open_nursery() as nursery:
            async def serve():
                nonlocal reason
                try:
                    await conn.handshake(5.0)
                except TlsHandshakeError as e:
                    reason = runtime.failure_reason(conn, e)
                conn.close()

            nursery.start_soon(serve)
            nursery.start_soon(connect, client_sock)
        return reason

    async def tls12_client(sock):
        client = TlsConn(sock, client_context(ca_file=server_files.ca, check_hostname=False,
                                              versions=ProtocolVersions("TLS_AUTO", "TLSV1_2")),
                         server_side=False, server_hostname="new.example.com")
        try:
            await client.handshake(5.0)
        except OSError:
            pass
        client.close()

    async def plaintext_client(sock):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: new.example.com\r\n\r\n")
        sock.close()

    assert await refused(*tcp_pair(), tls12_client) == "unsupported_protocol"
    assert await refused(*tcp_pair(), plaintext_client) == "not_tls"



async def test_a_client_that_sends_no_client_hello_times_out_as_a_handshake(server_files, monkeypatch):
    """Reading the ClientHello first uses up the handshake's time: a silent client then meets a
    handshake timeout (never a negative one, which Trio refuses)."""
    import pytest
    import trio

    from proxy.tls import listener as listener_module
    from proxy.tls.conn import HandshakeTimeout, TlsConn
    from tests.tls.certs import tcp_pair

    monkeypatch.setattr(listener_module, "HANDSHAKE_TIMEOUT_S", 0.2)
    servers = tuple(ServerTls((name,), "SIMPLE", CertificateFiles(server_files.cert, server_files.key, origin="files"),
                              listener="routes", min_protocol_version=minimum)
                    for name, minimum in (("*", "TLS_AUTO"), ("new.example.com", "TLSV1_3")))
    runtime = ListenerTls("l", servers, Stats())
    client_sock, server_sock = tcp_pair()
    try:
        context, client_hello, timeout_s = await runtime.starting_context(server_sock)
        assert client_hello == b"" and timeout_s == 0.0 and context is runtime.initial_context()
        conn = TlsConn(server_sock, context, server_side=True)  # no sweeper: a cancel scope keeps the time
        with pytest.raises(HandshakeTimeout):
            await conn.handshake(timeout_s)
        conn.close()
    finally:
        client_sock.close()
