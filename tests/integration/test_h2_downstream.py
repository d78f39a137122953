"""HTTP/2 downstream (h2c with prior knowledge) to HTTP/1.1 upstreams: real curl, nghttp, h2load and a
raw h2 client → the real proxy → the real HTTP/1.1 backend."""

from __future__ import annotations

import json
import re
import shutil

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from proxy.l7 import h2_server
from tests.integration.backend import Backend
from tests.integration.l7_harness import curl, make_snapshot, prefix_route, start_proxy


async def _setup(nursery, *, backends=1):
    bes = [await Backend(f"b{i}").start(nursery) for i in range(backends)]
    routes = [prefix_route(b"/dead", {"dead": 100}), prefix_route(b"/", {"svc": 100})]
    snap = make_snapshot({"svc": [b.port for b in bes], "dead": [1]}, routes, domains=("*",))
    proxy = await start_proxy(nursery, snap)
    return proxy, bes


class RawH2Client:
    """A minimal HTTP/2 client on the h2 package, for what curl cannot do (resets, many streams)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.responses: dict[int, dict] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None

    @classmethod
    async def connect(cls, port: int) -> "RawH2Client":
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def request(self, path: bytes, *, method: bytes = b"GET", body: bytes = b"", headers=()) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", path), *headers]
        self.conn.send_headers(sid, fields, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.responses[sid] = {"headers": None, "data": b"", "ended": False, "reset": None, "trailers": None}
        return sid

    async def pump(self, until, timeout_s: float = 5.0) -> None:
        with trio.fail_after(timeout_s):
            while not until():
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                for event in self.conn.receive_data(data):
                    r = self.responses.get(getattr(event, "stream_id", 0))
                    if isinstance(event, h2.events.ResponseReceived):
                        r["headers"] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        r["data"] += event.data
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        r["trailers"] = dict(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        r["ended"] = True
                    elif isinstance(event, h2.events.StreamReset):
                        r["reset"] = event.error_code
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.terminated = event
                await self.flush()

    def done(self, *sids: int):
        return lambda: all(self.responses[s]["ended"] or self.responses[s]["reset"] is not None for s in sids)


async def test_curl_prior_knowledge_get_and_post(nursery):
    proxy, (be,) = await _setup(nursery)
    url = f"http://127.0.0.1:{proxy.port}"
    code, out, err = await curl("--http2-prior-knowledge", "-i", f"{url}/small")
    assert code == 0, err
    assert out.startswith("HTTP/2 200"), out
    assert out.endswith("hello")
    code, out, err = await curl("--http2-prior-knowledge", f"{url}/echo?x=1", "-d", "a=1&b=2", "-H", "x-keep: yes")
    assert code == 0, err
    seen = json.loads(out)
    assert seen["method"] == "POST" and seen["target"] == "/echo?x=1" and seen["body"] == "a=1&b=2"
    names = dict((n.lower(), v) for n, v in seen["headers"])
    assert names["host"] == f"127.0.0.1:{proxy.port}", "the :authority travels as Host"
    assert names["x-keep"] == "yes"
    assert names["content-length"] == "7"
    assert proxy.counter("triomesh_downstream_rq_total", response_code="200") == 2


async def test_body_of_unknown_length_is_chunked_upstream_and_large_bodies_flow(nursery):
    proxy, (be,) = await _setup(nursery)
    client = await RawH2Client.connect(proxy.port)
    big = bytes(range(256)) * 4096  # 1 MiB: several times our window, so flow control must turn
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"),
                                   (b":path", b"/echo")])
    client.responses[sid] = {"headers": None, "data": b"", "ended": False, "reset": None, "trailers": None}
    sent = 0
    with trio.fail_after(10):
        while sent < len(big):
            window = min(client.conn.local_flow_control_window(sid), 16384)
            if window <= 0:
                data = await client.stream.receive_some(65536)
                for event in client.conn.receive_data(data):
                    pass
                await client.flush()
                continue
            n = min(window, len(big) - sent)
            client.conn.send_data(sid, big[sent:sent + n], end_stream=sent + n == len(big))
            sent += n
            await client.flush()
    await client.pump(client.done(sid), timeout_s=10)
    response = client.responses[sid]
    assert response["headers"][b":status"] == b"200"
    seen = json.loads(response["data"])
    assert len(seen["body"].encode("latin-1")) == len(big)
    names = dict((n.lower(), v) for n, v in seen["headers"])
    assert names.get("transfer-encoding") == "chunked", "no content-length: chunked to the HTTP/1.1 upstream"


async def test_many_concurrent_streams_with_h2load(nursery):
    if shutil.which("h2load") is None:
        pytest.fail("h2load (Debian nghttp2-client) is missing: make test installs it")
    proxy, bes = await _setup(nursery, backends=2)
    with trio.fail_after(30):
        proc = await trio.run_process(["h2load", "-n", "400", "-c", "4", "-m", "16",
                                       f"http://127.0.0.1:{proxy.port}/small"], capture_stdout=True, check=False)
    out = proc.stdout.decode()
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded", out), out
    assert "status codes: 400 2xx" in out, out
    assert proxy.counter("triomesh_downstream_rq_total", response_code="200") == 400


async def test_local_replies_and_a_grpc_request_to_a_dead_upstream(nursery):
    proxy, _ = await _setup(nursery)
    url = f"http://127.0.0.1:{proxy.port}"
    code, out, err = await curl("--http2-prior-knowledge", "-i", f"{url}/dead/x")
    assert out.startswith("HTTP/2 503"), out
    assert "upstream connect error" in out
    client = await RawH2Client.connect(proxy.port)
    sid = client.request(b"/dead/pkg.Svc/Call", method=b"POST", body=b"\x00\x00\x00\x00\x00",
                         headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")])
    await client.flush()
    await client.pump(client.done(sid))
    headers = client.responses[sid]["headers"]
    assert headers[b":status"] == b"200", "gRPC local replies are HTTP 200 with the status in grpc-status"
    assert headers[b"grpc-status"] == b"14", "no healthy/connect failure maps to UNAVAILABLE as in Envoy"
    assert b"upstream connect error" in headers[b"grpc-message"]
    assert client.responses[sid]["data"] == b""


async def test_a_reset_ends_one_stream_and_the_connection_goes_on(nursery):
    proxy, (be,) = await _setup(nursery)
    client = await RawH2Client.connect(proxy.port)
    slow = client.request(b"/slow?ms=2000")
    await client.flush()
    await trio.sleep(0.1)
    client.conn.reset_stream(slow)
    fast = client.request(b"/small")
    await client.flush()
    await client.pump(client.done(fast))
    assert client.responses[fast]["headers"][b":status"] == b"200"
    assert client.responses[fast]["data"] == b"hello"
    assert client.terminated is None


async def test_streams_reuse_workers_across_resets_and_bursts(nursery):
    """Streams are served by reusable workers: a reset ends only its own stream's worker, and bursts
    wider than the idle workers kept (MAX_IDLE_WORKERS) are all served, before and after."""
    proxy, (be,) = await _setup(nursery)
    client = await RawH2Client.connect(proxy.port)
    slow = [client.request(b"/slow?ms=400") for _ in range(3)]
    await client.flush()
    await trio.sleep(0.1)
    client.conn.reset_stream(slow[1])
    for _ in range(2):
        burst = [client.request(b"/small") for _ in range(h2_server.MAX_IDLE_WORKERS + 36)]
        await client.flush()
        await client.pump(client.done(*burst))
        assert all(client.responses[s]["headers"][b":status"] == b"200" for s in burst)
        assert all(client.responses[s]["data"] == b"hello" for s in burst)
    await client.pump(client.done(slow[0], slow[2]))
    for s in (slow[0], slow[2]):
        assert client.responses[s]["headers"][b":status"] == b"200", "a reset of one stream cancels no other"
    assert client.responses[slow[1]]["headers"] is None
    assert client.terminated is None


async def test_upstream_dying_mid_response_resets_only_that_stream(nursery):
    proxy, (be,) = await _setup(nursery)
    client = await RawH2Client.connect(proxy.port)
    broken = client.request(b"/die-mid-response")
    await client.flush()
    await client.pump(client.done(broken))
    assert client.responses[broken]["reset"] is not None, "a truncated response is a reset, never a clean end"
    ok = client.request(b"/small")
    await client.flush()
    await client.pump(client.done(ok))
    assert client.responses[ok]["data"] == b"hello"


async def test_h2c_upgrade_never_reaches_the_upstream(nursery):
    proxy, (be,) = await _setup(nursery)
    code, out, err = await curl("-i", "--http2", f"http://127.0.0.1:{proxy.port}/echo")
    assert code == 0, err
    assert out.startswith("HTTP/1.1 200"), "the upgrade is not taken: the answer is HTTP/1.1"
    seen = json.loads(out.split("\r\n\r\n", 1)[1])
    names = [n.lower() for n, _ in seen["headers"]]
    assert "upgrade" not in names and "http2-settings" not in names
    assert "connection" not in names


async def test_websocket_upgrade_still_works_over_http1(nursery):
    proxy, (be,) = await _setup(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        got = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in got:
                got += await stream.receive_some(4096)
        assert got.startswith(b"HTTP/1.1 101")


async def test_nghttp_with_concurrent_requests_and_a_post(nursery):
    if shutil.which("nghttp") is None:
        pytest.fail("nghttp (Debian nghttp2-client) is missing: make test installs it")
    proxy, (be,) = await _setup(nursery)
    url = f"http://127.0.0.1:{proxy.port}"
    with trio.fail_after(20):
        proc = await trio.run_process(["nghttp", "-v", "-n", f"{url}/small", f"{url}/chunked?n=50", f"{url}/echo"],
                                      capture_stdout=True, check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert out.count(":status: 200") == 3, out
    assert "recv SETTINGS frame" in out and "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):1024" in out


async def test_never_indexed_fields_stay_never_indexed_through_the_proxy(nursery):
    """RFC 7541 §7.1.3: a field the client sent never indexed (a token it does not want in any
    compression context, the proxy's shared upstream connection included) reaches an HTTP/2 upstream
    never indexed, and so does a response field the upstream sent so."""
    import dataclasses

    import hpack

    seen: list = []
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    upstream_port = listener.getsockname()[1]

    async def h2c_upstream(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        sock, _ = await listener.accept()
        stream = trio.SocketStream(sock)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    seen.append(event.headers)
                    conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-length", b"0"),
                                                        hpack.NeverIndexedHeaderTuple(b"x-token", b"t0k3n"),
                                                        (b"x-plain", b"p")], end_stream=True)
            await stream.send_all(conn.data_to_send())

    await nursery.start(h2c_upstream)
    snap = make_snapshot({"svc": [upstream_port]}, [prefix_route(b"/", {"svc": 100})], domains=("*",))
    snap = dataclasses.replace(snap, clusters={n: dataclasses.replace(c, http2=True) for n, c in snap.clusters.items()})
    proxy = await start_proxy(nursery, snap)
    client = await RawH2Client.connect(proxy.port)
    sids = [client.request(b"/secret", headers=[hpack.NeverIndexedHeaderTuple(b"x-api-key", b"s3cret"),
                                                (b"x-other", b"o")]) for _ in range(2)]
    responses_raw: list = []
    original = client.conn.receive_data

    def keep_raw(data):  # the response header tuples as hpack decoded them
        events = original(data)
        responses_raw.extend(e.headers for e in events if isinstance(e, h2.events.ResponseReceived))
        return events

    client.conn.receive_data = keep_raw
    await client.flush()
    await client.pump(client.done(*sids))
    assert len(seen) == 2
    for headers in seen:
        kinds = {bytes(n): type(f).__name__ for f in headers for n in [f[0]]}
        assert kinds[b"x-api-key"] == "NeverIndexedHeaderTuple", headers
        assert kinds[b"x-other"] == "HeaderTuple", headers
    assert len(responses_raw) == 2
    for headers in responses_raw:
        kinds = {bytes(f[0]): type(f).__name__ for f in headers}
        assert kinds[b"x-token"] == "NeverIndexedHeaderTuple", headers
        assert kinds[b"x-plain"] == "HeaderTuple", headers


async def test_local_reply_bodies_count_in_bytes_sent(nursery):
    """Envoy's BYTES_SENT counts the body of a reply the proxy made itself (here a connect failure's
    503); a HEAD reply sends no body, and a gRPC local reply is trailers-only."""
    from tests.integration.test_l7_edges import RecordingLog

    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port], "dead": [1]}, [prefix_route(b"/dead", {"dead": 100}),
                                                           prefix_route(b"/", {"svc": 100})])
    log = RecordingLog()
    proxy = await start_proxy(nursery, snap, access_log=log)
    client = await RawH2Client.connect(proxy.port)
    get = client.request(b"/dead/x")
    head = client.request(b"/dead/x", method=b"HEAD")
    grpc_call = client.request(b"/dead/pkg.Svc/Call", method=b"POST", body=b"\x00\x00\x00\x00\x00",
                               headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")])
    await client.flush()
    await client.pump(client.done(get, head, grpc_call))
    body = client.responses[get]["data"]
    assert body.startswith(b"upstream connect error")
    with trio.fail_after(5):
        while len(log.contexts) < 3:
            await trio.sleep(0.01)
    sent = {ctx.request.method: (ctx.status, ctx.bytes_sent) for ctx in log.contexts}
    assert sent == {b"GET": (503, len(body)), b"HEAD": (503, 0), b"POST": (200, 0)}


async def test_a_repeated_request_gets_a_head_of_its_own(nursery):
    """A client repeating a request sends the same header block bytes (all indexed), which the proxy
    checks once per connection: each request still gets its own head, so what the proxy adds to one
    (x-request-id, x-forwarded-proto...) never shows up in the next."""
    proxy, (be,) = await _setup(nursery)
    client = await RawH2Client.connect(proxy.port)
    seen = []
    for _ in range(3):
        sid = client.request(b"/echo", headers=[(b"x-keep", b"yes")])
        await client.flush()
        await client.pump(client.done(sid))
        seen.append([(n.lower(), v) for n, v in json.loads(client.responses[sid]["data"])["headers"]])
    for headers in seen:
        names = [n for n, _ in headers]
        assert names.count("x-request-id") == 1 and names.count("x-keep") == 1, headers
    assert len({dict(h)["x-request-id"] for h in seen}) == 3
    rest = [[h for h in headers if h[0] != "x-request-id"] for headers in seen]
    assert rest[0] == rest[1] == rest[2]
