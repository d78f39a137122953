"""A transparent sidecar's inbound capture with PeerAuthentication and AuthorizationPolicy, over real
sockets on 127.0.0.1: the capture server is handed each accepted connection with the original
destination iptables would have recorded (no namespace or iptables needed). A STRICT port closes a
plaintext connection (and TLS while the proxy has no workload certificate), a PERMISSIVE one serves
plaintext; inbound TCP is authorized
per connection (connection.sni from the ClientHello) and HTTP per request (403 through the inbound
virtual listener, HTTP/1.1 and h2c); only the workload's own policies apply."""

from __future__ import annotations

import socket

import trio

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.l4.addrs import ClientAddr, LocalAddr, OrigDstAddr
from proxy.l4.original_dst import TransparentConnection
from proxy.l4.transparent import CaptureServer, CaptureSettings
from proxy.l7.dataplane import DataPlane
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from tests.integration.test_h2_downstream import RawH2Client
from tests.l4.harness import receive_all, tcp_server
from tests.l4.tls_fixtures import client_hello

HTTP_PORT = 9080  # the app's captured HTTP port (nothing listens there: the defaultEndpoint serves it)
STRICT_PORT = 9443

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: httpbin, namespace: foo}
spec:
  workloadSelector: {labels: {app: httpbin}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:APP_PORT
    captureMode: IPTABLES
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    9443: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-posts, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["9080"]}}]
  - to: [{operation: {ports: ["DENIED_PORT"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: another-workload, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: another-namespace, namespace: bar}
spec:
  action: DENY
  rules: [{}]
"""


SNI_POLICY = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-blocked-sni, namespace: foo}
spec:
  action: DENY
  rules: [{when: [{key: connection.sni, values: [blocked.example]}]}]
"""


async def _echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(4096):
            await stream.send_all(b"echo " + data)


async def _http_handler(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp")


async def _closed_unanswered(client: trio.SocketStream) -> bool:
    """The proxy closed the connection (FIN, or RST since our bytes were left unread) sending nothing."""
    try:
        return await receive_all(client) == b""
    except trio.BrokenResourceError:
        return True


class Capture:
    """A real 127.0.0.1 listener whose accepted connections go to the capture server as if iptables
    had redirected them from `orig_dst_port`."""

    def __init__(self, server: CaptureServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)

    async def connect(self, orig_dst_port: int) -> trio.SocketStream:
        client = await trio.open_tcp_stream(*self.listener.getsockname())
        await trio.lowlevel.wait_readable(self.listener)
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        conn = TransparentConnection(sock, ClientAddr.from_sockaddr(sock.getpeername()),
                                     LocalAddr.from_sockaddr(sock.getsockname()),
                                     OrigDstAddr("127.0.0.1", orig_dst_port), redirected=True)
        self.nursery.start_soon(self.server._handle, "virtualInbound", conn)
        return client


async def test_inbound_peer_authentication_and_authorization(nursery):
    async with tcp_server(_http_handler) as app_port, tcp_server(_echo_handler) as echo_port, \
            tcp_server(_echo_handler) as denied_port:
        text = CONFIG.replace("APP_PORT", str(app_port)).replace("DENIED_PORT", str(denied_port))
        snapshot = compile_resources(load_bytes(text, "sidecar.yaml"), version="1", proxy_labels={"app": "httpbin"},
                                     proxy_namespace="foo")
        assert [p.name for p in snapshot.authorization.deny] == ["no-posts"]
        stats = Stats()
        plane = DataPlane(SnapshotHolder(snapshot), stats)
        server = CaptureServer(plane, stats, nursery, CaptureSettings(sniff_timeout_s=0.5))
        capture = Capture(server, nursery)
        with trio.fail_after(20):
            # PERMISSIVE (the workload's mode): plaintext TCP to an undeclared port passes through
            async with await capture.connect(echo_port) as client:
                await client.send_all(b"hi")
                assert await client.receive_some(100) == b"echo hi"

            # STRICT on 9443: a plaintext connection is closed unanswered, and counted
            async with await capture.connect(STRICT_PORT) as client:
                await client.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                assert await _closed_unanswered(client)
            assert stats.counter("triomesh_sidecar_inbound_plaintext_refused_total", port=str(STRICT_PORT)).value == 1
            assert stats.counter("triomesh_sidecar_cx_total", listener="virtualInbound", action="mtls_refused").value == 1

            # a TLS ClientHello on a STRICT port while this proxy has no workload certificate yet: closed
            # too (with one it is terminated: tests/l4/test_mesh_mtls.py)
            async with await capture.connect(STRICT_PORT) as client:
                await client.send_all(client_hello("httpbin.foo.svc.cluster.local", ["istio"]))
                assert await _closed_unanswered(client)
            assert stats.counter("triomesh_sidecar_inbound_mtls_total", port=str(STRICT_PORT), outcome="refused").value == 2

            # a DENY rule on the port: the connection is closed before it reaches the app
            async with await capture.connect(denied_port) as client:
                await client.send_all(b"hi")
                assert await _closed_unanswered(client)
            assert stats.counter("triomesh_rbac_denied_total", listener="virtualInbound").value == 1
            assert stats.counter("triomesh_rbac_allowed_total", listener="virtualInbound").value == 1

            # HTTP on the captured port: decided per request by the inbound virtual listener's chain
            async with await capture.connect(HTTP_PORT) as client:
                await client.send_all(b"GET / HTTP/1.1\r\nhost: httpbin\r\nconnection: close\r\n\r\n")
                reply = await receive_all(client)
                assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"app"), reply
            async with await capture.connect(HTTP_PORT) as client:
                await client.send_all(b"POST / HTTP/1.1\r\nhost: httpbin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                reply = await receive_all(client)
                assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n") and reply.endswith(b"\r\n\r\nRBAC: access denied")
            # the same listener serves h2c: the stage sees streams, whatever the protocol
            async with await capture.connect(HTTP_PORT) as stream:
                client = RawH2Client(stream)
                client.conn.initiate_connection()
                await client.flush()
                denied = client.request(b"/", method=b"POST", body=b"x")
                allowed = client.request(b"/")
                await client.pump(client.done(denied, allowed))
                assert client.responses[denied]["headers"][b":status"] == b"403"
                assert client.responses[denied]["data"] == b"RBAC: access denied"
                assert client.responses[allowed]["headers"][b":status"] == b"200"
            listener = f"inbound|{HTTP_PORT}"
            assert stats.counter("triomesh_rbac_denied_total", listener=listener).value == 2
            assert stats.counter("triomesh_rbac_allowed_total", listener=listener).value == 2
        capture.listener.close()
