"""Mesh mutual TLS for TCP between two sidecars, over real sockets on 127.0.0.1 with certificates
from the mesh CA: a client sidecar's outbound capture originates Istio mTLS (ALPN `istio`, SNI
`outbound_.<port>_._.<host>`) to an endpoint labelled `security.istio.io/tlsMode: istio` (auto mTLS),
and the server sidecar's inbound capture, STRICT, terminates it and hands the plaintext to a TCP
echo app. A plaintext client is refused; the bytes on the link are TLS; AuthorizationPolicy
principals on the TCP port allow one caller and deny another; a DestinationRule ISTIO_MUTUAL whose
subjectAltNames the server does not hold fails the handshake.

Each capture server is handed its accepted connections with the original destination iptables would
have recorded (no namespace or iptables needed), as in tests/l4/test_inbound_security.py."""

from __future__ import annotations

import socket

import trio

from controlplane.ca import CertificateAuthority
from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.identity.holder import IdentityHolder
from proxy.l4.addrs import ClientAddr, LocalAddr, OrigDstAddr
from proxy.l4.original_dst import TransparentConnection
from proxy.l4.transparent import CaptureServer, CaptureSettings
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats, merge, render_prometheus
from proxy.telemetry.istio_metrics import IstioMetrics
from proxy.telemetry.peer import identity_from_labels
from proxy.tls import mesh
from tests.l4.harness import receive_all, tcp_server
from tests.l4.test_inbound_security import _closed_unanswered, _echo_handler
from tests.l4.test_mesh_mtls import issue
from tests.tls.certs import stdlib_mesh_context

ECHO_VIP = "240.0.0.10"
ECHO_PORT = 7000
SERVER_PORT = 9000  # the server workload's port (its Sidecar ingress), where iptables would capture

SERVER_CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: echo, namespace: foo}
spec:
  workloadSelector: {labels: {app: echo}}
  ingress:
  - port: {number: 9000, protocol: HTTP, name: main}
    defaultEndpoint: 127.0.0.1:APP_PORT
    captureMode: IPTABLES
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo, namespace: foo}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]
"""

CLIENT_CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: APP, namespace: foo}
spec:
  workloadSelector: {labels: {app: APP}}
  egress: [{hosts: ["*/*"], captureMode: IPTABLES}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: foo}
spec:
  hosts: [echo.foo]
  addresses: [240.0.0.10]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp: SERVER_PORT}, labels: {app: echo, security.istio.io/tlsMode: istio}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo-wrong, namespace: foo}
spec:
  hosts: [echo-wrong.foo]
  addresses: [240.0.0.11]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp: SERVER_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo-old, namespace: foo}
spec:
  hosts: [echo-old.foo]
  addresses: [240.0.0.12]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp: OLD_PORT}, labels: {app: echo-old, security.istio.io/tlsMode: istio}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-wrong, namespace: foo}
spec:
  host: echo-wrong.foo
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/foo/sa/someone-else]}
"""


class Acceptor:
    """A real 127.0.0.1 listener whose connections go to `server` as if iptables had redirected them
    to `orig_dst` on `listener_name`; `first_bytes` keeps what each connection sent first."""

    def __init__(self, server: CaptureServer, listener_name: str, orig_dst: OrigDstAddr) -> None:
        self.server, self.listener_name, self.orig_dst = server, listener_name, orig_dst
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.first_bytes: list[bytes] = []

    async def serve(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.listener)
            sock, _ = self.listener.accept()
            sock.setblocking(False)
            nursery.start_soon(self._hand_over, sock)

    async def _hand_over(self, sock: socket.socket) -> None:
        with trio.move_on_after(5):
            await trio.lowlevel.wait_readable(sock)
            self.first_bytes.append(sock.recv(4096, socket.MSG_PEEK))
        conn = TransparentConnection(sock, ClientAddr.from_sockaddr(sock.getpeername()),
                                     LocalAddr.from_sockaddr(sock.getsockname()), self.orig_dst, redirected=True)
        await self.server._handle(self.listener_name, conn)


def sidecar(text: str, app: str, identity, nursery: trio.Nursery) -> tuple[DataPlane, Stats, CaptureServer]:
    labels = {"app": app, "version": "v1"}
    snapshot = compile_resources(load_bytes(text.replace("APP", app), f"{app}.yaml"), version="1", proxy_labels=labels,
                                 proxy_namespace="foo")
    stats = Stats()
    workload = identity_from_labels("foo", labels, f"{app}-v1")
    plane = DataPlane(SnapshotHolder(snapshot), stats, telemetry=IstioMetrics(stats, workload))
    plane.workload_identity = IdentityHolder()
    plane.load_identity(identity)
    return plane, stats, CaptureServer(plane, stats, nursery, CaptureSettings(sniff_timeout_s=0.5))


def metric_lines(stats: Stats, name: str) -> list[str]:
    """The samples of `name` as /stats/prometheus renders them."""
    return [line for line in render_prometheus(merge([stats.export()])).splitlines() if line.startswith(name + "{")]


async def wait_for_closed(stats: Stats) -> None:
    """The proxy counts a connection's bytes when both its directions ended (just after the client saw EOF)."""
    while not metric_lines(stats, "istio_tcp_connections_closed_total"):
        await trio.sleep(0.01)


async def test_tcp_between_sidecars_runs_over_mutual_tls_with_principals(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    old_identity = issue(ca, "foo", "echo-old")
    old_server_alpn: list = []

    async def old_sidecar(stream: trio.SocketStream) -> None:
        """A server sidecar that knows mesh mTLS but not the peer exchange, echoing."""
        tls = trio.SSLStream(stream, stdlib_mesh_context(old_identity, server_side=True, alpn=(mesh.ISTIO_TCP,)), server_side=True)
        async with tls:
            await tls.do_handshake()
            old_server_alpn.append(tls.selected_alpn_protocol())
            while data := await tls.receive_some(4096):
                await tls.send_all(b"old " + data)

    async with tcp_server(_echo_handler) as app_port, tcp_server(old_sidecar) as old_port:
        server_text = SERVER_CONFIG.replace("APP_PORT", str(app_port))
        _, server_stats, server_capture = sidecar(server_text, "echo", issue(ca, "foo", "echo"), nursery)
        inbound = Acceptor(server_capture, "virtualInbound", OrigDstAddr("127.0.0.1", SERVER_PORT))
        nursery.start_soon(inbound.serve, nursery)
        client_text = CLIENT_CONFIG.replace("SERVER_PORT", str(inbound.port)).replace("OLD_PORT", str(old_port))

        def outbound(app: str, service_account: str, vip: str = ECHO_VIP) -> tuple[Acceptor, Stats]:
            _, stats, capture = sidecar(client_text, app, issue(ca, "foo", service_account), nursery)
            acceptor = Acceptor(capture, "virtualOutbound", OrigDstAddr(vip, ECHO_PORT))
            nursery.start_soon(acceptor.serve, nursery)
            return acceptor, stats

        sleep, sleep_stats = outbound("sleep", "sleep")
        with trio.fail_after(20):
            # the caller's sidecar originates mesh mTLS; a request-then-half-close protocol works
            async with await trio.open_tcp_stream("127.0.0.1", sleep.port) as client:
                await client.send_all(b"PING\r\n")
                assert await client.receive_some(100) == b"echo PING\r\n"
                await client.send_eof()
                assert await receive_all(client) == b""
            # both sidecars learnt the other's workload facts (the peer exchange) and principal (certificates)
            await wait_for_closed(sleep_stats)
            await wait_for_closed(server_stats)
            source = metric_lines(sleep_stats, "istio_tcp_connections_closed_total")
            assert len(source) == 1, source
            for label in ('reporter="source"', 'source_workload="sleep-v1"', 'source_app="sleep"',
                          'destination_workload="echo-v1"', 'destination_app="echo"', 'destination_version="v1"',
                          'destination_canonical_service="echo"', 'destination_workload_namespace="foo"',
                          'destination_principal="spiffe://cluster.local/ns/foo/sa/echo"',
                          'source_principal="spiffe://cluster.local/ns/foo/sa/sleep"',
                          'destination_service="echo.foo"', 'request_protocol="tcp"'):
                assert label in source[0], (label, source[0])
            destination = metric_lines(server_stats, "istio_tcp_connections_closed_total")
            assert len(destination) == 1, destination
            for label in ('reporter="destination"', 'source_workload="sleep-v1"', 'source_app="sleep"',
                          'source_version="v1"', 'source_canonical_service="sleep"', 'source_workload_namespace="foo"',
                          'source_principal="spiffe://cluster.local/ns/foo/sa/sleep"', 'destination_workload="echo-v1"',
                          'destination_principal="spiffe://cluster.local/ns/foo/sa/echo"',
                          'connection_security_policy="mutual_tls"'):
                assert label in destination[0], (label, destination[0])
            # the frames were stripped: the app's bytes alone were counted, and echoed unchanged
            sent = metric_lines(server_stats, "istio_tcp_received_bytes_total")
            assert sent and sent[0].endswith(" 6"), sent  # "PING\r\n"

            hello = inbound.first_bytes[-1]
            assert hello[:1] == b"\x16" and b"istio" in hello, hello[:80]  # a ClientHello offering ALPN istio
            assert b"outbound_.7000_._.echo.foo" in hello  # Istio's SNI for the cluster
            assert b"PING" not in b"".join(inbound.first_bytes)
            assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(SERVER_PORT),
                                        outcome="mtls").value == 1

            # a plaintext client straight at the server sidecar: refused by STRICT
            async with await trio.open_tcp_stream("127.0.0.1", inbound.port) as plain:
                await plain.send_all(b"PING\r\n")
                assert await _closed_unanswered(plain)
            assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(SERVER_PORT),
                                        outcome="refused").value == 1

            # another mesh identity: the ALLOW policy's principals do not match, the connection closes
            intruder, _ = outbound("intruder", "intruder")
            async with await trio.open_tcp_stream("127.0.0.1", intruder.port) as client:
                await client.send_all(b"PING\r\n")
                assert await _closed_unanswered(client)

            # ISTIO_MUTUAL whose subjectAltNames the server does not hold: the handshake fails
            wrong, wrong_stats = outbound("sleep", "sleep", "240.0.0.11")
            async with await trio.open_tcp_stream("127.0.0.1", wrong.port) as client:
                await client.send_all(b"PING\r\n")
                assert await _closed_unanswered(client)
            assert wrong_stats.counter("triomesh_upstream_tls_handshake_fail_total", reason="fail_verify_san").value == 1

            # a server that does not speak the peer exchange (selects plain `istio`, as Envoy would):
            # no frames either way, the destination is the registry's, the principal the certificate's
            old, old_stats = outbound("sleep", "sleep", "240.0.0.12")
            async with await trio.open_tcp_stream("127.0.0.1", old.port) as client:
                await client.send_all(b"PING\r\n")
                assert await client.receive_some(100) == b"old PING\r\n"
            await wait_for_closed(old_stats)
            [line] = metric_lines(old_stats, "istio_tcp_connections_closed_total")
            for label in ('destination_workload="unknown"', 'destination_app="echo-old"',
                          'destination_principal="spiffe://cluster.local/ns/foo/sa/echo-old"'):
                assert label in line, (label, line)
            assert old_server_alpn == ["istio"]
