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
from proxy.stats import Stats
from tests.l4.harness import receive_all, tcp_server
from tests.l4.test_inbound_security import _closed_unanswered, _echo_handler
from tests.l4.test_mesh_mtls import issue

ECHO_VIP = "240.0.0.10"
ECHO_PORT = 7000

SERVER_CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: echo, namespace: foo}
spec:
  workloadSelector: {labels: {app: echo}}
  egress: [{hosts: ["*/*"], captureMode: IPTABLES}]
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
    snapshot = compile_resources(load_bytes(text.replace("APP", app), f"{app}.yaml"), version="1", proxy_labels={"app": app},
                                 proxy_namespace="foo")
    stats = Stats()
    plane = DataPlane(SnapshotHolder(snapshot), stats)
    plane.workload_identity = IdentityHolder()
    plane.workload_identity.swap(identity)
    return plane, stats, CaptureServer(plane, stats, nursery, CaptureSettings(sniff_timeout_s=0.5))


async def test_tcp_between_sidecars_runs_over_mutual_tls_with_principals(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    async with tcp_server(_echo_handler) as app_port:
        _, server_stats, server_capture = sidecar(SERVER_CONFIG, "echo", issue(ca, "foo", "echo"), nursery)
        inbound = Acceptor(server_capture, "virtualInbound", OrigDstAddr("127.0.0.1", app_port))
        nursery.start_soon(inbound.serve, nursery)
        client_text = CLIENT_CONFIG.replace("SERVER_PORT", str(inbound.port))

        def outbound(app: str, service_account: str, vip: str = ECHO_VIP) -> tuple[Acceptor, Stats]:
            _, stats, capture = sidecar(client_text, app, issue(ca, "foo", service_account), nursery)
            acceptor = Acceptor(capture, "virtualOutbound", OrigDstAddr(vip, ECHO_PORT))
            nursery.start_soon(acceptor.serve, nursery)
            return acceptor, stats

        sleep, _ = outbound("sleep", "sleep")
        with trio.fail_after(20):
            # the caller's sidecar originates mesh mTLS; a request-then-half-close protocol works
            async with await trio.open_tcp_stream("127.0.0.1", sleep.port) as client:
                await client.send_all(b"PING\r\n")
                assert await client.receive_some(100) == b"echo PING\r\n"
                await client.send_eof()
                assert await receive_all(client) == b""
            hello = inbound.first_bytes[-1]
            assert hello[:1] == b"\x16" and b"istio" in hello, hello[:80]  # a ClientHello offering ALPN istio
            assert b"outbound_.7000_._.echo.foo" in hello  # Istio's SNI for the cluster
            assert b"PING" not in b"".join(inbound.first_bytes)
            assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(app_port),
                                        outcome="mtls").value == 1

            # a plaintext client straight at the server sidecar: refused by STRICT
            async with await trio.open_tcp_stream("127.0.0.1", inbound.port) as plain:
                await plain.send_all(b"PING\r\n")
                assert await _closed_unanswered(plain)
            assert server_stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(app_port),
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
