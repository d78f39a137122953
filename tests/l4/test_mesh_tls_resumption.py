"""TLS session resumption between two sidecars over real sockets on 127.0.0.1 with certificates from
the mesh CA, as Envoy's sidecars resume: the client sidecar keeps the server's session ticket and its
next connection to that server resumes it (no certificates exchanged), with the same identity checks
on both sides; a session is never a way around them, and renewals on either side fall back to full
handshakes (proxy/tls/sessions.py). The harness is tests/l4/test_mesh_tcp.py's: the server sidecar
is STRICT with an AuthorizationPolicy that allows only the `sleep` identity, so every echo below is
also the server reading the caller's principal from the (resumed) session."""

from __future__ import annotations

import trio

from controlplane.ca import CertificateAuthority
from proxy.l4.addrs import OrigDstAddr
from proxy.l4.transparent import CaptureServer, CaptureSettings
from proxy.stats import Stats
from proxy.tls.sessions import MAX_WORKERS_FOR_SESSION_TICKETS, session_tickets_pay_off
from tests.l4.harness import tcp_server
from tests.l4.test_inbound_security import _closed_unanswered, _echo_handler
from tests.l4.test_mesh_mtls import issue
from tests.l4.test_mesh_tcp import CLIENT_CONFIG, ECHO_PORT, ECHO_VIP, SERVER_CONFIG, SERVER_PORT, Acceptor, sidecar

ALIAS_VIP = "240.0.0.13"
# the echo service with its own SNI, and another service at the same endpoint whose DestinationRule
# sends that SNI too but expects another identity: its connections are offered the session the echo
# service's connections kept
ALIAS_CONFIG = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: foo}
spec:
  host: echo.foo
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL, sni: echo.foo}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo-alias, namespace: foo}
spec:
  hosts: [echo-alias.foo]
  addresses: [240.0.0.13]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp: SERVER_PORT}, labels: {app: echo, security.istio.io/tlsMode: istio}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-alias, namespace: foo}
spec:
  host: echo-alias.foo
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL, sni: echo.foo,
          subjectAltNames: [spiffe://cluster.local/ns/foo/sa/someone-else]}
"""


def resumed(client_stats: Stats, server_stats: Stats) -> tuple[int, int]:
    """(the client sidecar's resumed upstream handshakes, the server sidecar's resumed inbound ones)."""
    return (client_stats.counter("triomesh_upstream_tls_session_reused_total").value,
            server_stats.counter("triomesh_sidecar_inbound_mtls_session_reused_total", port=str(SERVER_PORT)).value)


async def ping(port: int) -> None:
    """One connection through the client sidecar's outbound capture: echoed, so the server's policy
    allowed the caller's principal."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        await client.send_all(b"PING\r\n")
        assert await client.receive_some(100) == b"echo PING\r\n"


async def test_sidecars_resume_sessions_and_check_every_resumed_connection(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    async with tcp_server(_echo_handler) as app_port:
        server_plane, server_stats, server_capture = sidecar(SERVER_CONFIG.replace("APP_PORT", str(app_port)), "echo",
                                                             issue(ca, "foo", "echo"), nursery)
        inbound = Acceptor(server_capture, "virtualInbound", OrigDstAddr("127.0.0.1", SERVER_PORT))
        nursery.start_soon(inbound.serve, nursery)
        client_text = (CLIENT_CONFIG + ALIAS_CONFIG).replace("SERVER_PORT", str(inbound.port)).replace("OLD_PORT", "1")
        client_plane, client_stats, client_capture = sidecar(client_text, "sleep", issue(ca, "foo", "sleep"), nursery)
        echo = Acceptor(client_capture, "virtualOutbound", OrigDstAddr(ECHO_VIP, ECHO_PORT))
        alias = Acceptor(client_capture, "virtualOutbound", OrigDstAddr(ALIAS_VIP, ECHO_PORT))
        nursery.start_soon(echo.serve, nursery)
        nursery.start_soon(alias.serve, nursery)
        with trio.fail_after(20):
            # the first connection is a full handshake; the next ones resume its session
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (0, 0)
            await ping(echo.port)
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (2, 2)

            # the same server and SNI for a cluster that expects another identity: the session is
            # offered and the server resumes it, but the client still checks the server's SPIFFE ID
            # (carried by the session) and refuses
            async with await trio.open_tcp_stream("127.0.0.1", alias.port) as client:
                await client.send_all(b"PING\r\n")
                assert await _closed_unanswered(client)
            assert client_stats.counter("triomesh_upstream_tls_handshake_fail_total", reason="fail_verify_san").value == 1
            assert resumed(client_stats, server_stats) == (2, 3)

            # a renewed client certificate: sessions made with the old one are not offered again
            client_plane.load_identity(issue(ca, "foo", "sleep"))
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (2, 3)
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (3, 4)

            # a renewed server certificate: its new context cannot read tickets of the old one, so the
            # kept session makes a full handshake, not a failure
            server_plane.load_identity(issue(ca, "foo", "echo"))
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (3, 4)
            await ping(echo.port)
            assert resumed(client_stats, server_stats) == (4, 5)
        assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(SERVER_PORT),
                                    outcome="mtls").value == 8


async def test_a_server_of_many_workers_sends_no_tickets_to_resume(nursery, tmp_path):
    """Each worker process has its own ticket keys, so with more than MAX_WORKERS_FOR_SESSION_TICKETS
    workers a ticket would rarely find its worker again: such a server sends none worth keeping,
    sparing the full handshake their cost, and clients make full handshakes."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    async with tcp_server(_echo_handler) as app_port:
        server_plane, server_stats, _ = sidecar(SERVER_CONFIG.replace("APP_PORT", str(app_port)), "echo",
                                                issue(ca, "foo", "echo"), nursery)
        server_plane.session_tickets = session_tickets_pay_off(MAX_WORKERS_FOR_SESSION_TICKETS + 1)
        server_capture = CaptureServer(server_plane, server_stats, nursery, CaptureSettings(sniff_timeout_s=0.5))
        inbound = Acceptor(server_capture, "virtualInbound", OrigDstAddr("127.0.0.1", SERVER_PORT))
        nursery.start_soon(inbound.serve, nursery)
        client_text = CLIENT_CONFIG.replace("SERVER_PORT", str(inbound.port)).replace("OLD_PORT", "1")
        _, client_stats, client_capture = sidecar(client_text, "sleep", issue(ca, "foo", "sleep"), nursery)
        echo = Acceptor(client_capture, "virtualOutbound", OrigDstAddr(ECHO_VIP, ECHO_PORT))
        nursery.start_soon(echo.serve, nursery)
        with trio.fail_after(20):
            for _ in range(3):
                await ping(echo.port)
        assert resumed(client_stats, server_stats) == (0, 0)
        assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(SERVER_PORT),
                                    outcome="mtls").value == 3
