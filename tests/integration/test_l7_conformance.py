"""RFC 9112 edges over real sockets: Host field values, fragments in the target, HTTP/1.0
keep-alive, and a request head that never completes (408)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio

from proxy.l7.dataplane import HttpSettings
from tests.integration.backend import Backend
from tests.integration.l7_harness import make_snapshot, prefix_route, raw_exchange, start_proxy


class RecordingLog:
    """An access log that keeps the finished request contexts."""

    enabled = True

    def __init__(self) -> None:
        self.contexts: list = []

    def emit(self, ctx) -> None:
        self.contexts.append(ctx)


async def _setup(nursery, *, settings=None, access_log=None):
    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port]}, [prefix_route(b"/", {"svc": 100})])
    proxy = await start_proxy(nursery, snap, settings, access_log=access_log)
    return proxy, be


def _echoed(out: bytes) -> dict:
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out[:200]
    return json.loads(body)


# ---- Host (RFC 9112 §3.2, RFC 3986 §3.2.2) -------------------------------------------------------

@pytest.mark.parametrize("host", [
    b"example.com", b"example.com:8080", b"EXAMPLE.com", b"a-b_c~d.example", b"xn--bcher-kva.example",
    b"10.1.2.3", b"10.1.2.3:80", b"[::1]", b"[::1]:8080", b"[2001:db8::1]:443", b"[::ffff:10.0.0.1]",
    b"[v1.fe80::a+en1]", b"svc%2Dx.example", b"example.com:", b"sub-delims!$&'()*+,;=.example",
])
async def test_valid_host_is_forwarded(nursery, host):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nhost: " + host + b"\r\nconnection: close\r\n\r\n")
    seen = dict(_echoed(out)["headers"])
    assert seen["host"] == host.decode()
    assert len(be.requests) == 1


async def test_empty_host_is_valid(nursery):
    """RFC 9110 §7.2: an empty Host is what a client sends when the target has no authority; the
    upstream then gets the cluster's service host, as for an HTTP/1.0 request without Host."""
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nhost: \r\nconnection: close\r\n\r\n")
    assert dict(_echoed(out)["headers"])["host"] == "svc"


@pytest.mark.parametrize("host", [
    b"exa mple.com", b"example.com/path", b"example.com?q", b"user@example.com", b"example.com\\x",
    b"exam\"ple", b"ex<am>ple", b"example.com:80:80", b"example.com:http", b"example.com:-1",
    b"example.com:65536", b"example.com:123456", b"[::1", b"::1", b"[::1]x", b"[not-an-ip]", b"[1:2:3]",
    b"[::1]:8o", b"%zz.example", b"example.com%", b"ex{a}mple",
])
async def test_invalid_host_is_400_and_closed(nursery, host):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nhost: " + host + b"\r\n\r\n"
                             b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert b"connection: close" in out
    assert out.count(b"HTTP/1.1 ") == 1, "nothing after the 400"
    assert be.requests == []


async def test_invalid_authority_in_absolute_form_is_400(nursery):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET http://user@svc.example/echo HTTP/1.1\r\nhost: svc.example\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert be.requests == []


async def test_host_valid_once_is_still_checked_exactly_next_time(nursery):
    """The remembered valid values never let a different (invalid) value through."""
    proxy, be = await _setup(nursery)
    ok = await raw_exchange(proxy.port, b"GET /small HTTP/1.1\r\nhost: svc.example\r\nconnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    bad = await raw_exchange(proxy.port, b"GET /small HTTP/1.1\r\nhost: svc.example/\r\nconnection: close\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400")
    assert len(be.requests) == 1


async def test_two_host_fields_are_400(nursery):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nhost: a.example\r\nhost: a.example\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert be.requests == []


# ---- fragments (RFC 9110 §7.1) -----------------------------------------------------------------

@pytest.mark.parametrize("target, forwarded", [
    (b"/echo#frag", "/echo"),
    (b"/echo?x=1#frag", "/echo?x=1"),
    (b"/echo#", "/echo"),
    (b"/echo#a#b?c", "/echo"),
    (b"http://svc.example/echo?q#frag", "/echo?q"),
    (b"http://svc.example#frag", "/"),
])
async def test_fragment_is_not_forwarded(nursery, target, forwarded):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET " + target + b" HTTP/1.1\r\nhost: svc.example\r\nconnection: close\r\n\r\n")
    if forwarded == "/":  # the backend answers 404 to "/", which is still what it was asked for
        assert out.startswith(b"HTTP/1.1 404"), out
    else:
        assert _echoed(out)["target"] == forwarded
    assert [r["target"] for r in be.requests] == [forwarded]


async def test_fragment_is_not_routed_on(nursery):
    """A route on the path never sees the fragment (a `#` cannot dodge a prefix or exact match)."""
    be = await Backend().start(nursery)
    exact = dataclasses.replace(prefix_route(b"/small", {"svc": 100}), matches=lambda head: head.path == b"/small")
    snap = make_snapshot({"svc": [be.port]}, [exact])
    proxy = await start_proxy(nursery, snap)
    out = await raw_exchange(proxy.port, b"GET /small#x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello"), out


async def test_target_that_is_only_a_fragment_is_400(nursery):
    proxy, be = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET #frag HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    assert be.requests == []


# ---- HTTP/1.0 keep-alive (RFC 9112 §9.3) ---------------------------------------------------------

async def _exchange_open(stream, request: bytes, limit_s: float = 5.0) -> tuple[bytes, bytes]:
    """Send a request on an open stream, read one content-length-delimited response."""
    await stream.send_all(request)
    got = b""
    with trio.fail_after(limit_s):
        while b"\r\n\r\n" not in got:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed before a response head: {got!r}"
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            assert chunk, "closed inside a body"
            body += chunk
    return head, body


@pytest.mark.parametrize("path", [b"/small", b"/status/204", b"/nowhere-on-this-backend"])
async def test_http10_keep_alive_is_announced_and_kept(nursery, path):
    proxy, be = await _setup(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        for _ in range(2):
            head, _ = await _exchange_open(stream, b"GET " + path + b" HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            assert b"\r\nconnection: keep-alive" in head, head
            assert b"connection: close" not in head
        assert len(be.requests) == 2, "both requests went over the kept connection"


async def test_http10_keep_alive_for_a_local_reply(nursery):
    """A reply the proxy makes itself (no route) also says keep-alive to a 1.0 client."""
    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port]}, [prefix_route(b"/only-here", {"svc": 100})])
    proxy = await start_proxy(nursery, snap)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        for _ in range(2):
            head, _ = await _exchange_open(stream, b"GET /elsewhere HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404") and b"\r\nconnection: keep-alive" in head, head


@pytest.mark.parametrize("path", [b"/chunked?n=2", b"/close-delimited"])
async def test_http10_keep_alive_with_unknown_length_is_closed(nursery, path):
    """A body of unknown length cannot be chunked to a 1.0 client: it ends with the connection,
    and the head says so."""
    proxy, _ = await _setup(nursery)
    out = await raw_exchange(proxy.port, b"GET " + path + b" HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
                             read_timeout_s=5)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"connection: close" in head and b"keep-alive" not in head
    assert body in (b"piece-0\npiece-1\n", b"until-the-end")


async def test_http10_without_keep_alive_is_closed(nursery):
    proxy, _ = await _setup(nursery)
    with trio.fail_after(5):
        out = await raw_exchange(proxy.port, b"GET /small HTTP/1.0\r\n\r\n")
    assert b"connection: close" in out and out.endswith(b"hello")


# ---- header timeout (Envoy's request_headers_timeout) --------------------------------------------

async def test_partial_head_gets_408_within_the_header_timeout(nursery):
    log = RecordingLog()
    proxy, be = await _setup(nursery, settings=HttpSettings(request_headers_timeout_s=0.5), access_log=log)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    started = trio.current_time()
    got = b""
    async with stream:
        await stream.send_all(b"GET /small HTTP/1.1\r\nhost: x\r\n")
        with trio.fail_after(3):
            for byte in b"x-slow: 1":  # slowloris: a byte now and then, never the end of the head
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
    elapsed = trio.current_time() - started
    assert got.startswith(b"HTTP/1.1 408 Request Timeout"), got
    assert b"connection: close" in got and got.endswith(b"request header timeout")
    assert 0.4 <= elapsed < 1.5, f"answered after {elapsed:.2f} s for a 0.5 s timeout"
    assert be.requests == []
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 1
    assert proxy.counter("triomesh_downstream_rq_total", response_code="408") == 1
    assert [(c.status, c.response_flags) for c in log.contexts] == [(408, [])]


async def test_idle_connection_is_closed_without_a_reply(nursery):
    """Nothing of a request arrived: the idle timeout closes quietly (no 408, nothing logged)."""
    log = RecordingLog()
    proxy, _ = await _setup(nursery, settings=HttpSettings(request_headers_timeout_s=0.3, idle_timeout_s=0.3),
                            access_log=log)
    with trio.fail_after(3):
        out = await raw_exchange(proxy.port, b"", read_timeout_s=3)
    assert out == b""
    assert log.contexts == []
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 0


async def test_idle_keep_alive_connection_after_a_request_is_closed_without_a_reply(nursery):
    proxy, _ = await _setup(nursery, settings=HttpSettings(request_headers_timeout_s=0.3, idle_timeout_s=0.3))
    with trio.fail_after(3):
        out = await raw_exchange(proxy.port, b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n", read_timeout_s=3)
    assert out.count(b"HTTP/1.1 ") == 1 and out.endswith(b"hello"), out
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 0
