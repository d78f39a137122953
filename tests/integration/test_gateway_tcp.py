"""A Gateway TCP server in the real `triomesh proxy` process (an edge tcp-echo): a VirtualService tcp
route splitting 80/20 between two real TCP echo backends, a server no tcp route applies to,
connectionPool.tcp.maxConnections and outlier detection on TCP connections."""

from __future__ import annotations

from functools import partial

import trio

from tests.runner.harness import Proxy, free_port

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: echo-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: SPLIT_PORT, name: tcp, protocol: TCP}
    hosts: ["*"]
  - port: {number: NO_ROUTE_PORT, name: tcp-unrouted, protocol: TCP}
    hosts: ["*"]
  - port: {number: LIMITED_PORT, name: redis, protocol: REDIS}
    hosts: ["*"]
  - port: {number: EJECT_PORT, name: mongo, protocol: MONGO}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  endpoints:
  - {address: 127.0.0.1, ports: {tcp: V1_PORT}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {tcp: V2_PORT}, labels: {version: v2, pool: b}}
  - {address: 127.0.0.1, ports: {tcp: DEAD_PORT}, labels: {version: v3, pool: b}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: shop}
spec:
  host: tcp-echo.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - name: limited
    labels: {version: v1}
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
  - name: v2-or-dead
    labels: {pool: b}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [echo-gateway]
  tcp:
  - match: [{port: SPLIT_PORT}]
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
      weight: 80
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}
      weight: 20
  - match: [{port: LIMITED_PORT}]
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: limited}
  - match: [{port: EJECT_PORT}]
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2-or-dead}
"""

CONNECTIONS = 400


class EchoBackend:
    """Answers each line with "<name> <line>", like Istio's tcp-echo sample; counts connections."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.connections = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> EchoBackend:
        (listener,) = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listener.socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    await stream.send_all(self.name + b" " + line + b"\n")


async def _open(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _echo(port: int, text: bytes) -> bytes:
    async with await _open(port) as stream:
        await stream.send_all(text + b"\n")
        return await _read_line(stream)


async def _closed_without_data(port: int) -> bool:
    """Whether the proxy ends the connection (FIN or RST) without sending a byte."""
    try:
        stream = await _open(port)
    except OSError:  # reset before the connect call returned
        return True
    async with stream:
        try:
            await stream.send_all(b"hello\n")
            return await stream.receive_some(4096) == b""
        except trio.BrokenResourceError:  # reset
            return True


async def test_weighted_tcp_split_at_the_gateway(nursery, tmp_path):
    v1 = await EchoBackend("one").start(nursery)
    v2 = await EchoBackend("two").start(nursery)
    dead_port = free_port()  # nothing listens there: connecting to it is refused
    ports = {name: free_port() for name in ("SPLIT_PORT", "NO_ROUTE_PORT", "LIMITED_PORT", "EJECT_PORT")}
    text = CONFIG.replace("V1_PORT", str(v1.port)).replace("V2_PORT", str(v2.port)).replace("DEAD_PORT", str(dead_port))
    for name, port in ports.items():
        text = text.replace(name, str(port))
    config = tmp_path / "tcp-echo.yaml"
    config.write_text(text)
    proxy = Proxy(config=config, workdir=tmp_path, concurrency=1, access_log="off")
    await trio.to_thread.run_sync(proxy.start)
    try:
        # --- 80/20 split over real connections, at most 8 at once
        replies: list[bytes] = []
        limiter = trio.CapacityLimiter(8)

        async def one(i: int) -> None:
            async with limiter:
                replies.append(await _echo(ports["SPLIT_PORT"], b"ping %d" % i))

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for i in range(CONNECTIONS):
                    n.start_soon(one, i)
        assert len(replies) == CONNECTIONS
        assert all(r.startswith((b"one ping ", b"two ping ")) and r.endswith(b"\n") for r in replies), replies[:5]
        to_v1 = sum(r.startswith(b"one ") for r in replies)
        # binomial(400, 0.8): mean 320, sigma 8; +-60 is 7.5 sigma, so this never fails by chance,
        # and a broken split (50/50, 100/0) lands far outside it
        assert abs(to_v1 - 320) <= 60, to_v1
        # every connection reached the backend its reply names, and the stats agree exactly
        assert (v1.connections, v2.connections) == (to_v1, CONNECTIONS - to_v1)
        # a scrape may come before the worker has counted the last connections (or answer with the
        # worker's previous figures when it is slow to reply): wait for the exact counts
        expected = {(("cluster", "outbound|9000|v1|tcp-echo.shop.svc.cluster.local"),): to_v1,
                    (("cluster", "outbound|9000|v2|tcp-echo.shop.svc.cluster.local"),): CONNECTIONS - to_v1}
        split_listener = f"127.0.0.1_{ports['SPLIT_PORT']}"

        def counted() -> bool:
            per_cluster = proxy.stats("triomesh_tcp_downstream_cx_total")
            actions = proxy.stats("triomesh_gateway_tcp_cx_total")
            return (all(per_cluster.get(key) == value for key, value in expected.items())
                    and actions.get((("action", "tcp"), ("listener", split_listener))) == CONNECTIONS)

        await trio.to_thread.run_sync(proxy.wait_for, counted, "the split's exact connection counts")

        # --- no tcp route applies to this server: connections are closed, nothing is proxied
        with trio.fail_after(10):
            assert await _closed_without_data(ports["NO_ROUTE_PORT"])
        actions = await trio.to_thread.run_sync(proxy.stats, "triomesh_gateway_tcp_cx_total")
        assert actions[(("action", "no_route"), ("listener", f"127.0.0.1_{ports['NO_ROUTE_PORT']}"))] == 1

        # --- tcp.maxConnections 1: a second connection while the first is open is reset
        before = v1.connections
        with trio.fail_after(10):
            async with await _open(ports["LIMITED_PORT"]) as held:
                await held.send_all(b"first\n")
                assert await _read_line(held) == b"one first\n"
                assert await _closed_without_data(ports["LIMITED_PORT"])
            # the held connection is gone: the limit admits a new one
            while True:
                try:
                    reply = await _echo(ports["LIMITED_PORT"], b"again")
                except (trio.BrokenResourceError, OSError):
                    reply = b""
                if reply == b"one again\n":
                    break
                await trio.sleep(0.05)  # the proxy has not yet seen the held connection end
        assert v1.connections >= before + 2
        limited = "outbound|9000|limited|tcp-echo.shop.svc.cluster.local"
        overflow = await trio.to_thread.run_sync(proxy.stats, "triomesh_upstream_rq_pending_overflow_total")
        assert overflow[(("cluster", limited),)] >= 1

        # --- outlier detection: the endpoint that refuses connections is ejected after one failure
        with trio.fail_after(20):
            outcomes = []
            for i in range(6):
                try:
                    outcomes.append(await _echo(ports["EJECT_PORT"], b"e%d" % i))
                except (trio.BrokenResourceError, OSError):
                    outcomes.append(b"")
        assert outcomes.count(b"") == 1, outcomes  # round robin reached the dead endpoint once
        assert outcomes[outcomes.index(b"") + 1:] == [b"two e%d\n" % i for i in range(outcomes.index(b"") + 1, 6)]
        ejected = await trio.to_thread.run_sync(proxy.stats, "triomesh_outlier_ejections_total")
        assert ejected[(("cluster", "outbound|9000|v2-or-dead|tcp-echo.shop.svc.cluster.local"),)] == 1

        dump = await trio.to_thread.run_sync(proxy.config_dump)
        assert "'tcp_route'" in str(dump)
    finally:
        await trio.to_thread.run_sync(proxy.stop)

