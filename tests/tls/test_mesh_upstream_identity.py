"""Identity on a client sidecar's pooled HTTP connections over mesh mTLS, with real sockets on
127.0.0.1 and certificates from the mesh CA: requests report the server certificate's SPIFFE ID as
`destination_principal`; after a renewal of the workload certificate the pooled connections made
with the old one are closed (idle ones at once, one busy at the renewal once it is idle again) and
new requests go over connections made with the new certificate."""

from __future__ import annotations

import trio

from controlplane.ca import CertificateAuthority
from proxy.l4.addrs import OrigDstAddr
from proxy.tls import mesh
from tests.l4.harness import tcp_server
from tests.l4.test_mesh_mtls import issue
from tests.l4.test_mesh_tcp import Acceptor, metric_lines, sidecar
from tests.tls.certs import stdlib_mesh_context

CLIENT_CONFIG = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: sleep, namespace: foo}
spec:
  workloadSelector: {labels: {app: sleep}}
  egress: [{hosts: ["*/*"], captureMode: IPTABLES}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: foo}
spec:
  hosts: [web.foo]
  addresses: [240.0.0.20]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: WEB_PORT}, labels: {app: web, security.istio.io/tlsMode: istio}}]
"""

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
            b"x-triomesh-peer: namespace=foo;workload=web-v1;app=web;version=v1\r\n\r\nok")


async def request(stream: trio.SocketStream, path: str = "/") -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: web.foo:8080\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b"ok"):
        chunk = await stream.receive_some(4096)
        assert chunk, reply
        reply += chunk
    return reply


async def test_destination_principal_and_pools_follow_certificate_renewal(nursery, tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    web_identity = issue(ca, "foo", "web")
    connections: list[dict] = []  # per upstream connection the server saw: client serial, closed

    async def web_sidecar(stream: trio.SocketStream) -> None:
        """A server sidecar answering keep-alive requests over mesh mTLS (a /slow one after 0.3 s)."""
        tls = trio.SSLStream(stream, stdlib_mesh_context(web_identity, server_side=True, alpn=mesh.SERVER_ALPN), server_side=True)
        await tls.do_handshake()
        seen = {"serial": format(int(tls.getpeercert()["serialNumber"], 16), "x"), "closed": trio.Event()}
        connections.append(seen)
        buffered = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = await tls.receive_some(4096)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                if b" /slow " in head:
                    await trio.sleep(0.3)
                await tls.send_all(RESPONSE)
        except trio.BrokenResourceError:
            pass
        finally:
            seen["closed"].set()

    async with tcp_server(web_sidecar) as web_port:
        first = issue(ca, "foo", "sleep")
        plane, stats, capture = sidecar(CLIENT_CONFIG.replace("WEB_PORT", str(web_port)), "sleep", first, nursery)
        outbound = Acceptor(capture, "virtualOutbound", OrigDstAddr("240.0.0.20", 8080))
        nursery.start_soon(outbound.serve, nursery)
        with trio.fail_after(20):
            client = await trio.open_tcp_stream("127.0.0.1", outbound.port)
            assert (await request(client)).startswith(b"HTTP/1.1 200")
            assert (await request(client)).startswith(b"HTTP/1.1 200")
            assert [c["serial"] for c in connections] == [first.serial]  # one pooled connection

            # destination_principal: the SPIFFE ID the server's certificate proved
            [line] = metric_lines(stats, "istio_requests_total")
            for label in ('reporter="source"', 'destination_workload="web-v1"',
                          'destination_principal="spiffe://cluster.local/ns/foo/sa/web"'):
                assert label in line, (label, line)

            # renewal (what a worker does on LoadIdentity): the idle connection of the old certificate
            # closes, the next request gets a new connection with the new one
            second = issue(ca, "foo", "sleep")
            plane.load_identity(second)
            await connections[0]["closed"].wait()
            assert (await request(client)).startswith(b"HTTP/1.1 200")
            assert [c["serial"] for c in connections] == [first.serial, second.serial]

            # a connection busy at the renewal is not pooled for reuse: the sweep closes it once idle
            third = issue(ca, "foo", "sleep")
            async with trio.open_nursery() as during:
                during.start_soon(request, client, "/slow")
                await trio.sleep(0.1)
                plane.load_identity(third)
            assert not connections[1]["closed"].is_set()  # back in the pool, still of the old certificate
            plane.sweep_pools()
            await connections[1]["closed"].wait()
            assert (await request(client)).startswith(b"HTTP/1.1 200")
            assert [c["serial"] for c in connections] == [first.serial, second.serial, third.serial]
            await client.aclose()
