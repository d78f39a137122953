"""gRPC through the proxy: a real grpcio client → the proxy (h2c downstream) → a real grpcio server
(h2c upstream, the cluster's http2), and HTTP/1.1 clients to that HTTP/2 upstream."""

from __future__ import annotations

import dataclasses
import socket
import struct

import grpc
import pytest
import trio

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.config.snapshot import RetryPolicy
from proxy.l7.dataplane import DataPlane
from proxy.l7.server import serve_listener
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from tests import grpc_apps
from tests.integration.l7_harness import make_snapshot, prefix_route, start_proxy
from tests.integration.test_h2_downstream import RawH2Client


@pytest.fixture
def grpc_servers():
    servers = [grpc_apps.start_grpc_server(name=f"grpc-{i}")[0] for i in range(2)]
    yield servers
    for s in servers:
        s.close()


async def _proxy(nursery, servers, *, retry=None, timeout_s=None, pool=None):
    route = prefix_route(b"/", {"grpc": 100}, timeout_s=timeout_s)
    if retry is not None:
        route = dataclasses.replace(route, retry=retry)
    snap = make_snapshot({"grpc": [s.port for s in servers]}, [route])
    snap = dataclasses.replace(snap, clusters={
        name: dataclasses.replace(c, http2=True, connection_pool=pool or c.connection_pool)
        for name, c in snap.clusters.items()})
    return await start_proxy(nursery, snap)


def _call(fn, *args, **kwargs):
    return trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_unary_and_streaming_rpcs(nursery, grpc_servers):
    proxy = await _proxy(nursery, grpc_servers)
    target = f"127.0.0.1:{proxy.port}"
    result = await _call(grpc_apps.unary, target, b"ping", metadata=(("x-request-id", "rid-1"),), timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    assert result.response.endswith(b":ping")
    assert result.initial("x-request-id") == "rid-1"
    assert result.trailing("x-served-by") in ("grpc-0", "grpc-1"), "trailers travel end to end"

    result = await _call(grpc_apps.client_stream, target, [b"a" * 1000] * 50, timeout=10)
    assert result.code == grpc.StatusCode.OK and result.response == b"50:50000"

    result = await _call(grpc_apps.server_stream, target, 3, 4 * 1024 * 1024, timeout=20)
    assert result.code == grpc.StatusCode.OK, result
    assert [len(m) for m in result.response] == [4 * 1024 * 1024] * 3
    assert result.response[2] == grpc_apps.stream_message(2, 4 * 1024 * 1024)

    result, order = await _call(grpc_apps.bidi_interleaved, target, [b"m%d" % i for i in range(10)], timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    assert order[:4] == ["send 0", "recv 0", "send 1", "recv 1"], "bidi streams without buffering whole calls"
    assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") <= 2, "streams share HTTP/2 connections"


async def _concurrent_slow_calls(target: str, n: int, delay_ms: int) -> list:
    results: list = []

    async def one(i: int) -> None:
        results.append(await _call(grpc_apps.unary, target, b"c%d" % i,
                                   metadata=(("x-delay-ms", str(delay_ms)),), timeout=20))

    async with trio.open_nursery() as calls:
        for i in range(n):
            calls.start_soon(one, i)
    return results


async def test_a_burst_opens_one_connection_per_max_concurrent_streams(nursery, grpc_servers):
    """20 calls at once with maxConcurrentStreams 5: 4 connections, not one per call (requests wait
    for the slots of a connection still connecting), and at tcp.maxConnections 2 the rest wait as
    pending requests for a free slot instead of failing."""
    from proxy.config.snapshot import ConnectionPool

    proxy = await _proxy(nursery, grpc_servers[:1], pool=ConnectionPool(max_concurrent_streams=5))
    results = await _concurrent_slow_calls(f"127.0.0.1:{proxy.port}", 20, 300)
    assert [r.code for r in results] == [grpc.StatusCode.OK] * 20, results
    assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") == 4

    proxy = await _proxy(nursery, grpc_servers[:1],
                         pool=ConnectionPool(max_concurrent_streams=5, max_connections=2))
    results = await _concurrent_slow_calls(f"127.0.0.1:{proxy.port}", 20, 300)
    assert [r.code for r in results] == [grpc.StatusCode.OK] * 20, results
    assert proxy.counter("triomesh_upstream_cx_total", cluster="grpc") == 2
    assert proxy.counter("triomesh_upstream_rq_pending_overflow_total", cluster="grpc") == 0

    proxy = await _proxy(nursery, grpc_servers[:1],
                         pool=ConnectionPool(max_concurrent_streams=5, max_connections=1, max_pending_requests=2))
    results = await _concurrent_slow_calls(f"127.0.0.1:{proxy.port}", 12, 500)
    codes = sorted(r.code.value[0] for r in results)
    assert codes.count(0) == 7, results  # 5 slots + 2 pending; the other 5 overflow (503 UO -> UNAVAILABLE)
    assert codes.count(grpc.StatusCode.UNAVAILABLE.value[0]) == 5, results
    assert proxy.counter("triomesh_upstream_rq_pending_overflow_total", cluster="grpc") == 5


async def test_mirror_to_an_http2_cluster_goes_as_a_stream(nursery, grpc_servers):
    """A mirror cluster that speaks HTTP/2 (a gRPC service) gets its copy on its HTTP/2 pool, with
    -shadow appended to the authority, and the copy's outcome is counted, never seen by the caller.
    The copy carries the peer metadata of its own cluster: ours to the mesh-internal mirror, though
    the primary is outside the mesh and gets none."""
    from proxy.config.snapshot import MirrorPolicy

    primary, shadow = grpc_servers
    route = dataclasses.replace(prefix_route(b"/", {"grpc": 100}), mirrors=(MirrorPolicy("shadow", 1_000_000),))
    snap = make_snapshot({"grpc": [primary.port], "shadow": [shadow.port]}, [route])
    snap = dataclasses.replace(snap, clusters={name: dataclasses.replace(c, http2=True, mesh_internal=name == "shadow")
                                               for name, c in snap.clusters.items()})
    proxy = await start_proxy(nursery, snap)
    result = await _call(grpc_apps.unary, f"127.0.0.1:{proxy.port}", b"copy me",
                         metadata=(("x-request-id", "mirrored-1"),), timeout=10)
    assert result.code == grpc.StatusCode.OK and result.trailing("x-served-by") == primary.name
    with trio.fail_after(5):
        while shadow.calls("Unary") < 1 or proxy.plane.mirrors_in_flight:
            await trio.sleep(0.02)
    assert shadow.calls() == 1 and primary.calls() == 1
    assert shadow.records[0].get("x-request-id") == "mirrored-1", shadow.records[0]
    assert shadow.records[0].get("x-triomesh-peer") is not None, shadow.records[0]
    assert primary.records[0].get("x-triomesh-peer") is None, primary.records[0]
    assert proxy.counter("triomesh_mirror_requests_total", cluster="shadow") == 1
    assert proxy.counter("triomesh_mirror_failed_total", cluster="shadow") == 0


async def test_error_status_and_message_reach_the_client(nursery, grpc_servers):
    proxy = await _proxy(nursery, grpc_servers)
    result = await _call(grpc_apps.unary, f"127.0.0.1:{proxy.port}", b"x", metadata=(("x-fail-status", "7"),),
                         timeout=10)
    assert result.code == grpc.StatusCode.PERMISSION_DENIED
    assert result.details == grpc_apps.FAIL_DETAILS
    assert proxy.counter("triomesh_downstream_grpc_rq_total", grpc_status="7") == 1, "stats carry the gRPC status"
    assert proxy.counter("triomesh_downstream_rq_total", response_code="200") == 1


async def test_deadline_exceeded(nursery, grpc_servers):
    proxy = await _proxy(nursery, grpc_servers)
    with trio.fail_after(5):
        result = await _call(grpc_apps.unary, f"127.0.0.1:{proxy.port}", b"x", metadata=(("x-delay-ms", "3000"),),
                             timeout=0.5)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_grpc_timeout_is_the_route_timeout(nursery, grpc_servers):
    """Without a route timeout, the proxy itself gives up at the client's grpc-timeout (Istio)."""
    proxy = await _proxy(nursery, grpc_servers)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    client = RawH2Client(stream)
    client.conn.initiate_connection()
    sid = client.request(b"/triomesh.test.Echo/Unary", method=b"POST", body=b"\x00\x00\x00\x00\x01x",
                         headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers"),
                                  (b"grpc-timeout", b"300m"), (b"x-delay-ms", b"3000")])
    await client.flush()
    start = trio.current_time()
    await client.pump(client.done(sid), timeout_s=5)
    assert trio.current_time() - start < 2.0
    headers = client.responses[sid]["headers"]
    # DEADLINE_EXCEEDED, not the UNAVAILABLE that a 504 maps to (which clients would retry)
    assert headers[b"grpc-status"] == b"4" and b"timeout" in headers[b"grpc-message"]


async def test_retry_on_unavailable_succeeds(nursery, grpc_servers):
    retry = RetryPolicy(num_retries=3, retry_on=frozenset({"unavailable"}), backoff_base_s=0.001)
    proxy = await _proxy(nursery, grpc_servers[:1], retry=retry)  # the failure count is per server
    result = await _call(grpc_apps.unary, f"127.0.0.1:{proxy.port}", b"x",
                         metadata=(("x-fail-times", "2"), ("x-fail-key", "k1")), timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    calls = grpc_servers[0].calls("Unary")
    assert calls == 3, "two UNAVAILABLE answers retried, the third try served"
    assert proxy.counter("triomesh_upstream_rq_retry_total", cluster="grpc") == 2


async def test_http1_client_to_an_http2_upstream_gets_trailers_in_the_last_chunk(nursery, grpc_servers):
    proxy = await _proxy(nursery, grpc_servers)
    message = b"hello"
    frame = struct.pack(">BI", 0, len(message)) + message
    request = (b"POST /triomesh.test.Echo/Unary HTTP/1.1\r\nHost: svc\r\ncontent-type: application/grpc\r\n"
               b"te: trailers\r\ncontent-length: %d\r\n\r\n" % len(frame)) + frame
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    got = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(5):
            while not got.endswith(b"\r\n\r\n") or b"grpc-status" not in got:
                got += await stream.receive_some(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), got
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"grpc-0:hello" in body or b"grpc-1:hello" in body
    assert b"\r\n0\r\ngrpc-status: 0\r\n" in body, body


GRPC_YAML = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  servers:
  - port: {number: 8080, name: grpc, protocol: GRPC}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.example.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7070, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.1, ports: {grpc: SERVER_PORT}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{headers: {x-chaos: {exact: "yes"}}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: echo.example.com}}]
  - route: [{destination: {host: echo.example.com}}]
    retries: {attempts: 3, retryOn: "unavailable,cancelled"}
"""


async def test_istio_yaml_grpc_port_fault_abort_and_retries(nursery, grpc_servers):
    """Istio's own YAML: a GRPC Gateway server, a ServiceEntry port of protocol GRPC (spoken to in
    HTTP/2 without any DestinationRule), fault abort grpcStatus, retryOn gRPC conditions."""
    snap = compile_resources(load_bytes(GRPC_YAML.replace("SERVER_PORT", str(grpc_servers[0].port)).encode(),
                                        "grpc.yaml"), version="1", bind_address="127.0.0.1")
    cluster = snap.clusters["outbound|7070||echo.example.com"]
    assert cluster.http2, "a GRPC port is spoken to in HTTP/2"
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    plane = DataPlane(SnapshotHolder(snap), Stats())
    await nursery.start(serve_listener, sock, snap.listeners[0].name, plane)
    target = f"127.0.0.1:{port}"

    result = await _call(grpc_apps.unary, target, b"x", metadata=(("x-chaos", "yes"),), timeout=10)
    assert result.code == grpc.StatusCode.UNAVAILABLE and result.details == "fault filter abort"
    assert grpc_servers[0].calls("Unary") == 0

    result = await _call(grpc_apps.unary, target, b"y", metadata=(("x-fail-times", "2"), ("x-fail-key", "yaml")),
                         timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    assert grpc_servers[0].calls("Unary") == 3
    assert plane.stats.counter("triomesh_downstream_grpc_rq_total", grpc_status="14").value == 1
