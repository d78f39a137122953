"""The real HTTP data plane fed by the control plane (in one process, real sockets): the runner's
reload path in miniature (client -> compile -> SnapshotHolder.swap). A weight change applied on the
control plane shifts live traffic within a second, and requests under a config change every 200 ms
all succeed."""

from __future__ import annotations

import socket

import trio

from controlplane.store import ConfigStore
from controlplane.wire import ApplyRequest, Source
from proxy.config.compile import compile_resources
from proxy.l7.dataplane import DataPlane
from proxy.l7.server import serve_listener
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from proxy.xds.client import NodeInfo, run_client

from cp_harness import raw_connect, start_plane, wait_for


async def backend(name: bytes, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep-alive HTTP/1.1 server answering every request with its name."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(name), name))
        except trio.BrokenResourceError:
            pass

    await trio.serve_listeners(handle, listeners)


class Client:
    """Sequential keep-alive GETs to the proxy; records every response body (or the failure)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bodies: list[bytes] = []
        self.failures: list[str] = []

    async def run(self, count: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        buf = b""
        for _ in range(count):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: recommendation\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    self.failures.append("connection closed")
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            body, buf = buf[:length], buf[length:]
            if not head.startswith(b"HTTP/1.1 200"):
                self.failures.append(head.split(b"\r\n")[0].decode())
            self.bodies.append(body)
        await stream.aclose()


def mesh(port: int, v1_port: int, v2_port: int, w1: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: tutorial}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: recommendation, namespace: tutorial}}
spec:
  hosts: [recommendation]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1_port}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2_port}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: recommendation, namespace: tutorial}}
spec:
  host: recommendation
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
""" + weights(w1)


def weights(w1: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: recommendation, namespace: tutorial}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - route:
    - {{destination: {{host: recommendation, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: recommendation, subset: v2}}, weight: {100 - w1}}}
"""


async def start_mesh(nursery: trio.Nursery, tmp_path, w1: int = 80):
    v1 = await nursery.start(backend, b"v1")
    v2 = await nursery.start(backend, b"v2")
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    (tmp_path / "mesh.yaml").write_text(mesh(port, v1, v2, w1))
    store = ConfigStore(tmp_path)
    store.load_directory()
    plane, cp_port = await start_plane(nursery, store)
    holder = SnapshotHolder()
    data_plane = DataPlane(holder, Stats())
    data_plane.background = nursery

    def on_resources(resources, version):  # the runner's reload: compile, then swap atomically
        holder.swap(compile_resources(resources, version=version, bind_address="127.0.0.1"))

    state = await nursery.start(run_client, ("127.0.0.1", cp_port), NodeInfo("gateway-1", namespace="tutorial"),
                                on_resources)
    await wait_for(lambda: state.version, what="first snapshot")
    await nursery.start(serve_listener, sock, f"127.0.0.1_{port}", data_plane)
    return port, cp_port, state


async def apply(cp_port: int, text: str):
    framed = await raw_connect(cp_port)
    await framed.send(ApplyRequest(sources=[Source("weights.yaml", text.encode())]))
    result = await framed.receive()
    await framed.aclose()
    assert result.ok, result.error
    return result


async def test_apply_shifts_live_traffic_within_a_second(tmp_path, nursery):
    port, cp_port, state = await start_mesh(nursery, tmp_path, w1=100)
    warm = Client(port)
    await warm.run(20)
    assert set(warm.bodies) == {b"v1"} and not warm.failures
    before = state.version
    t0 = trio.current_time()
    await apply(cp_port, weights(0))
    # keep sending; the first response from v2 marks the shift
    client = Client(port)
    with trio.fail_after(5):
        while b"v2" not in client.bodies:
            await client.run(1)
    shifted_s = trio.current_time() - t0
    assert shifted_s < 1.0, f"traffic shifted after {shifted_s:.3f}s"
    assert state.version != before
    after = Client(port)
    await after.run(50)
    assert set(after.bodies) == {b"v2"} and not after.failures


async def test_no_request_fails_while_the_config_changes_every_200ms(tmp_path, nursery):
    port, cp_port, state = await start_mesh(nursery, tmp_path, w1=80)
    clients = [Client(port) for _ in range(4)]

    async def changes() -> None:
        for i in range(15):  # 3 s of changes
            await apply(cp_port, weights(20 if i % 2 == 0 else 80))
            await trio.sleep(0.2)

    async with trio.open_nursery() as n:
        n.start_soon(changes)
        for c in clients:
            n.start_soon(c.run, 400)
    total = sum(len(c.bodies) for c in clients)
    assert total == 1600
    assert [f for c in clients for f in c.failures] == []
    assert state.acks >= 5  # the changes were applied meanwhile (debounced)
