"""The HTTP/1.1 pipeline end to end: real client (curl or raw socket) → real proxy → real backend."""

from __future__ import annotations

import json

import pytest
import trio

from proxy.l7.dataplane import HttpSettings
from tests.integration.backend import Backend
from tests.integration.l7_harness import curl, make_snapshot, prefix_route, raw_exchange, start_proxy


async def _setup(nursery, *, backends=1, settings=None, timeout_s=None, extra_clusters=None):
    bes = [await Backend(f"b{i}").start(nursery) for i in range(backends)]
    clusters = {"svc": [b.port for b in bes]}
    clusters.update(extra_clusters or {})
    routes = [prefix_route(b"/nowhere-cluster", {"missing": 100}),
              prefix_route(b"/dead", {"dead": 100}) if "dead" in clusters else None,
              prefix_route(b"/", {"svc": 100}, timeout_s=timeout_s)]
    snap = make_snapshot(clusters, [r for r in routes if r is not None], domains=("*",))
    proxy = await start_proxy(nursery, snap, settings)
    return proxy, bes


async def test_simple_get_with_curl_and_keep_alive(nursery):
    proxy, (be,) = await _setup(nursery)
    url = f"http://127.0.0.1:{proxy.port}/small"
    code, out, err = await curl("-i", url, url, url)
    assert code == 0, err
    assert out.count("HTTP/1.1 200 OK") == 3
    assert out.count("hello") == 3
    assert be.connections == 1, "upstream connection is pooled and reused"
    assert proxy.counter("triomesh_downstream_rq_total", response_code="200") == 3
    assert proxy.counter("triomesh_downstream_cx_total") == 1


async def test_pooled_upstream_connections_age_on_trios_clock(nursery, mock_clock):
    """The data plane reads the run's clock object (not trio.current_time(), not the system clock):
    a trio.testing.MockClock jump past the upstream idle timeout expires the pooled connection."""
    mock_clock.rate = 1.0  # virtual time runs with real time, plus the jump below
    proxy, (be,) = await _setup(nursery)
    url = f"http://127.0.0.1:{proxy.port}/small"
    for expected_connections in (1, 1):
        code, out, err = await curl("-s", url)
        assert (code, out) == (0, "hello"), err
        assert be.connections == expected_connections
    mock_clock.jump(HttpSettings().upstream_idle_timeout_s + 1)
    code, out, err = await curl("-s", url)
    assert (code, out) == (0, "hello"), err
    assert be.connections == 2, "the idle connection expired on the jumped clock"


async def test_forwarding_headers_and_hop_by_hop(nursery):
    proxy, (be,) = await _setup(nursery)
    code, out, err = await curl(f"http://127.0.0.1:{proxy.port}/echo", "-H", "Connection: keep-alive, x-drop-me",
                                "-H", "x-drop-me: 1", "-H", "Keep-Alive: timeout=5", "-H", "x-keep: yes",
                                "-H", "X-Forwarded-For: 10.9.9.9")
    assert code == 0, err
    seen = dict((n.lower(), v) for n, v in json.loads(out)["headers"])
    assert seen["x-keep"] == "yes"
    assert "x-drop-me" not in seen and "keep-alive" not in seen
    assert seen["x-forwarded-for"] == "10.9.9.9,127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert len(seen["x-request-id"]) == 36 and seen["x-request-id"][14] == "4"
    assert seen["host"] == f"127.0.0.1:{proxy.port}"


async def test_request_id_kept_when_present(nursery):
    proxy, _ = await _setup(nursery)
    code, out, _ = await curl(f"http://127.0.0.1:{proxy.port}/echo", "-H", "x-request-id: abc-123")
    seen = dict((n.lower(), v) for n, v in json.loads(out)["headers"])
    assert seen["x-request-id"] == "abc-123"


@pytest.mark.parametrize("size", [0, 1, 70_000, 3_000_000])
async def test_request_body_content_length_streamed(nursery, size, tmp_path):
    proxy, _ = await _setup(nursery)
    f = tmp_path / "body"
    f.write_bytes(b"a" * size)
    code, out, err = await curl(f"http://127.0.0.1:{proxy.port}/echo", "--data-binary", f"@{f}",
                                "-H", "Expect:")
    assert code == 0, err
    assert len(json.loads(out)["body"]) == size


async def test_chunked_request_and_expect_100_continue(nursery, tmp_path):
    proxy, be = await _setup(nursery)
    f = tmp_path / "body"
    f.write_bytes(b"z" * 200_000)
    code, out, err = await curl("-v", f"http://127.0.0.1:{proxy.port}/echo", "--data-binary", f"@{f}",
                                "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue")
    assert code == 0, err
    assert "HTTP/1.1 100 Continue" in err
    record = json.loads(out)
    assert len(record["body"]) == 200_000
    names = [n.lower() for n, _ in record["headers"]]
    assert "expect" not in names, "the proxy answers 100-continue itself"
    assert "transfer-encoding" in names


async def test_chunked_response_passes_as_chunked(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /chunked?n=4 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"0\r\n\r\n")
    code, text, _ = await curl(f"http://127.0.0.1:{proxy.port}/chunked?n=5")
    assert text == "".join(f"piece-{i}\n" for i in range(5))


async def test_close_delimited_response_becomes_chunked_for_http11(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /close-delimited HTTP/1.1\r\nhost: x\r\n\r\n"
                             b"GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2, out
    assert b"transfer-encoding: chunked" in out
    assert b"until-the-end" in out and out.endswith(b"hello")


async def test_http10_client(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /chunked?n=2 HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower(), "an HTTP/1.0 client never gets chunked"
    assert body == b"piece-0\npiece-1\n"
    # keep-alive only when asked for
    out = await raw_exchange(proxy.port, b"GET /small HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
                             b"GET /small HTTP/1.0\r\n\r\n")
    assert out.count(b"hello") == 2


async def test_pipelined_requests_answered_in_order(nursery):
    proxy, _ = await _setup(nursery)
    reqs = b"".join(b"GET /slow?ms=%d HTTP/1.1\r\nhost: x\r\nx-n: %d\r\n\r\n" % (ms, i)
                    for i, ms in enumerate([120, 10, 60]))
    reqs += b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody"
    out = await raw_exchange(proxy.port, reqs)
    assert out.count(b"HTTP/1.1 200") == 4
    assert out.index(b"hello") < out.index(b'"body": "body"')


async def test_head_request_keeps_content_length(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"HEAD /head-test HTTP/1.1\r\nhost: x\r\n\r\n"
                             b"GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    first, _, rest = out.partition(b"\r\n\r\n")
    assert b"content-length: 1234" in first
    assert rest.startswith(b"HTTP/1.1 200"), "no body after a HEAD response"


async def test_websocket_upgrade_becomes_tunnel(nursery):
    proxy, _ = await _setup(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n")
        got = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in got:
                got += await stream.receive_some(4096)
        assert got.startswith(b"HTTP/1.1 101")
        assert b"upgrade: websocket" in got.lower()
        for msg in (b"hello", b"tunnel"):
            await stream.send_all(msg)
            echoed = b""
            with trio.fail_after(5):
                while len(echoed) < len(msg):
                    echoed += await stream.receive_some(4096)
            assert echoed == msg.upper()


# ---- errors like Envoy's ---------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nhost: x\r\nbad header: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: x\r\nfolded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: x\r\nx: a\rb\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nhost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no host
    b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    b"GE(T / HTTP/1.1\r\nhost: x\r\n\r\n",
])
async def test_malformed_request_is_400_and_closed(nursery, raw):
    proxy, (be,) = await _setup(nursery)
    out = await raw_exchange(proxy.port, raw + b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert b"connection: close" in out
    assert out.count(b"HTTP/1.1") == 1, "nothing after the 400"
    assert be.requests == []


@pytest.mark.parametrize("raw", [
    b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nabcdef",
    b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5, 6\r\n\r\nabcdef",
    b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\nabcde",
    b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
])
async def test_smuggling_shapes_rejected(nursery, raw):
    proxy, (be,) = await _setup(nursery)
    out = await raw_exchange(proxy.port, raw + b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert out.count(b"HTTP/1.1 ") == 1
    assert be.requests == [], "nothing ambiguous reaches the upstream"


async def test_same_content_length_twice_is_accepted(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                             b"content-length: 3\r\nconnection: close\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 200") and b'"body": "abc"' in out


async def test_head_too_large_is_431(nursery):
    proxy, _ = await _setup(nursery)
    big = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    out = await raw_exchange(proxy.port, big)
    assert out.startswith(b"HTTP/1.1 431"), out[:100]
    many = b"GET / HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(101)) + b"\r\n"
    out = await raw_exchange(proxy.port, many)
    assert out.startswith(b"HTTP/1.1 431"), out[:100]
    ok = b"GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + b"".join(
        b"x-h%d: v\r\n" % i for i in range(98)) + b"\r\n"
    assert (await raw_exchange(proxy.port, ok)).startswith(b"HTTP/1.1 200")


async def test_no_route_is_404(nursery):
    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port]}, [prefix_route(b"/sma", {"svc": 100})], domains=("only.example",))
    proxy = await start_proxy(nursery, snap)
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/small", "-H", "Host: other.example")
    assert out.startswith("HTTP/1.1 404")
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/nope", "-H", "Host: only.example")
    assert out.startswith("HTTP/1.1 404")
    assert be.requests == []
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/small", "-H", "Host: only.example:8080")
    assert out.startswith("HTTP/1.1 200")
    assert proxy.counter("triomesh_response_flags_total", flag="NR") == 2


async def test_connect_refused_is_503_uf_and_no_endpoints_is_uh(nursery):
    with trio.socket.socket() as s:  # a port nobody listens on: bind, never listen
        await s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        proxy, _ = await _setup(nursery, extra_clusters={"dead": [dead_port], "missing-eps": []})
        code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/dead")
    assert out.startswith("HTTP/1.1 503")
    assert "upstream connect error or disconnect/reset before headers. reset reason: connection failure" in out
    assert proxy.counter("triomesh_response_flags_total", flag="UF") == 1
    assert proxy.counter("triomesh_upstream_cx_connect_fail_total", cluster="dead") == 1


async def test_no_healthy_upstream_is_503_uh(nursery):
    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port], "empty": []}, [prefix_route(b"/", {"empty": 100})])
    proxy = await start_proxy(nursery, snap)
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/x")
    assert out.startswith("HTTP/1.1 503") and out.endswith("no healthy upstream")
    assert proxy.counter("triomesh_response_flags_total", flag="UH") == 1


async def test_upstream_dies_mid_response_resets_downstream(nursery):
    proxy, _ = await _setup(nursery)
    code, out, err = await curl(f"http://127.0.0.1:{proxy.port}/die-mid-response")
    assert code != 0, "curl must see a failure, never a complete-looking response"
    out = await raw_exchange(proxy.port, b"GET /die-mid-response HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"0123456789" in out
    assert out.endswith(b"<RESET>"), "a reset, never a clean close after a short body"


async def test_upstream_closes_before_response_is_503(nursery):
    proxy, _ = await _setup(nursery)
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/die-before-response")
    assert out.startswith("HTTP/1.1 503")
    assert proxy.counter("triomesh_response_flags_total", flag="UC") == 1


async def test_route_timeout_is_504(nursery):
    proxy, _ = await _setup(nursery, timeout_s=0.2)
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/slow?ms=1500")
    assert out.startswith("HTTP/1.1 504") and out.endswith("upstream request timeout")
    code, out, _ = await curl("-i", f"http://127.0.0.1:{proxy.port}/slow?ms=10")
    assert out.startswith("HTTP/1.1 200")


async def test_early_upstream_response_to_large_upload(nursery, tmp_path):
    proxy, _ = await _setup(nursery)
    f = tmp_path / "body"
    f.write_bytes(b"u" * 8_000_000)
    code, out, err = await curl("-i", f"http://127.0.0.1:{proxy.port}/early-413", "--data-binary", f"@{f}",
                                "-H", "Expect:")
    assert out.startswith("HTTP/1.1 413"), (code, err)


async def test_header_read_timeout_and_idle_timeout_close(nursery):
    settings = HttpSettings(request_headers_timeout_s=0.3, idle_timeout_s=0.5)
    proxy, _ = await _setup(nursery, settings=settings)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"GET /small HTTP/1.1\r\nhost: x\r\n")  # never finishes the head
        with trio.fail_after(3):
            start = trio.current_time()
            got = b""
            while chunk := await stream.receive_some(100):
                got += chunk
            assert 0.25 < trio.current_time() - start < 2
        assert got.startswith(b"HTTP/1.1 408"), got  # a started head is answered, then closed
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while b"hello" not in got:
            got += await stream.receive_some(100)
        with trio.fail_after(3):
            start = trio.current_time()
            assert await stream.receive_some(100) == b""  # idle keep-alive connection closed
            assert 0.4 < trio.current_time() - start < 2


async def test_round_robin_over_endpoints(nursery):
    proxy, bes = await _setup(nursery, backends=3)
    for _ in range(30):
        code, out, _ = await curl(f"http://127.0.0.1:{proxy.port}/small")
        assert out == "hello"
    counts = sorted(len(b.requests) for b in bes)
    assert counts == [10, 10, 10]


async def test_absolute_form_request_target(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET http://svc.example:8080/echo?x=1 HTTP/1.1\r\nhost: ignored\r\n"
                             b"connection: close\r\n\r\n")
    record = json.loads(out.partition(b"\r\n\r\n")[2])
    assert record["target"] == "/echo?x=1"
    assert dict(record["headers"])["host"] == "svc.example:8080"


async def test_bytes_after_a_response_never_answer_another_request(nursery):
    proxy, (be,) = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /extra-bytes HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.endswith(b"\r\n\r\nok")
    for _ in range(3):  # other clients: the polluted upstream connection must not have been pooled
        out = await raw_exchange(proxy.port, b"GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert out.endswith(b"hello") and b"POISON" not in out, out


async def test_stream_idle_timeout_ends_stalled_bodies(nursery):
    settings = HttpSettings(stream_idle_timeout_s=0.4)
    proxy, _ = await _setup(nursery, settings=settings)
    # a client that stops half-way through its request body
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        with trio.fail_after(5):
            start = trio.current_time()
            got = b""
            while True:
                try:
                    chunk = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                got += chunk
            assert 0.3 < trio.current_time() - start < 3
    # an upstream that goes quiet mid-response: the client sees a reset, not a hang
    with trio.fail_after(5):
        out = await raw_exchange(proxy.port, b"GET /stall-mid-response HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"<RESET>")
    with trio.fail_after(3):
        while proxy.plane.downstream_cx_active.value:
            await trio.sleep(0.05)


async def test_head_of_a_chunked_response_invents_no_length(nursery):
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"HEAD /chunked HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert b"content-length" not in out.lower()


async def test_idle_upstream_connections_of_a_removed_cluster_are_closed(nursery):
    proxy, (be,) = await _setup(nursery)
    code, out, _ = await curl(f"http://127.0.0.1:{proxy.port}/small")
    assert out == "hello"
    active = proxy.plane.stats.gauge("triomesh_upstream_cx_active", cluster="svc")
    assert active.value == 1 and len(proxy.plane.pools) == 1  # pooled, idle
    other = await Backend("other").start(nursery)
    proxy.plane.holder.swap(make_snapshot({"svc2": [other.port]}, [prefix_route(b"/", {"svc2": 100})], version="2"))
    with trio.fail_after(5):  # the sweeper's housekeeping runs about once a second
        while active.value or proxy.plane.pools:
            await trio.sleep(0.1)
