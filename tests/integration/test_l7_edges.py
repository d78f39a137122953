"""Edges of the HTTP/1.1 data path's fast paths: end of stream in the same readiness edge as a
request, what the access log says of a response that never reached a client, and a pool's idle
timeout changed by a new snapshot."""

from __future__ import annotations

import dataclasses
import socket
import struct
from functools import partial

import trio

from proxy.config.snapshot import ConnectionPool
from proxy.l7.dataplane import HttpSettings
from tests.integration.backend import Backend
from tests.integration.l7_harness import make_snapshot, prefix_route, start_proxy


class RecordingLog:
    """An access log that keeps the finished request contexts."""

    enabled = True

    def __init__(self) -> None:
        self.contexts: list = []

    def emit(self, ctx) -> None:
        self.contexts.append(ctx)


async def _setup(nursery, *, settings=None, pool=None, access_log=None):
    be = await Backend().start(nursery)
    snap = make_snapshot({"svc": [be.port]}, [prefix_route(b"/", {"svc": 100})])
    if pool is not None:
        clusters = dict(snap.clusters)
        clusters["svc"] = dataclasses.replace(clusters["svc"], connection_pool=pool)
        snap = dataclasses.replace(snap, clusters=clusters)
    proxy = await start_proxy(nursery, snap, settings, access_log=access_log)
    return proxy, be, snap


async def _read_until_close(sock, limit_s: float) -> tuple[bytes, float]:
    started = trio.current_time()
    got = b""
    with trio.move_on_after(limit_s):
        while True:
            data = await sock.recv(65536)
            if not data:
                break
            got += data
    return got, trio.current_time() - started


async def test_request_followed_at_once_by_half_close_is_answered_and_closed(nursery):
    """The FIN arrives with the request (one edge-triggered readiness report): the proxy answers,
    then sees the end of the stream at once instead of waiting out the idle timeout."""
    proxy, _, _ = await _setup(nursery, settings=HttpSettings(idle_timeout_s=5))
    for _ in range(5):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", proxy.port))
        await sock.send(b"GET /small HTTP/1.1\r\nhost: a\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        got, took_s = await _read_until_close(sock, 8)
        sock.close()
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"hello"), got
        assert took_s < 2, f"the connection was closed only after {took_s:.1f} s"


async def test_upstream_fin_right_after_a_keep_alive_response_is_seen_on_reuse(nursery):
    """An upstream that half-closes right after a keep-alive response (the FIN may share a readiness
    edge with the response, or come just after it while the connection sits in the pool): the next
    request on that pooled connection sees the end at once and is retried on a new connection,
    instead of waiting for an answer that never comes."""
    accepted = []

    async def half_closing_backend(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.send_eof()  # keeps reading, never answers again
        with trio.move_on_after(10):
            while await stream.receive_some(65536):
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, half_closing_backend, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    snap = make_snapshot({"svc": [port]}, [prefix_route(b"/", {"svc": 100})])
    proxy = await start_proxy(nursery, snap, HttpSettings(stream_idle_timeout_s=5))
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        for _ in range(4):
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            got = b""
            with trio.fail_after(3):
                while not got.endswith(b"ok"):
                    got += await stream.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 200"), got
    assert len(accepted) == 4  # each reuse found the old connection ended and opened a new one


async def test_bytes_sent_stays_zero_when_the_client_is_gone_before_the_response(nursery):
    log = RecordingLog()
    proxy, _, _ = await _setup(nursery, access_log=log)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"GET /slow?ms=200 HTTP/1.1\r\nhost: a\r\n\r\n")
    await trio.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset before the response comes
    with trio.fail_after(5):
        while not log.contexts:
            await trio.sleep(0.05)
    ctx = log.contexts[0]
    assert "DC" in ctx.response_flags and ctx.status == 0
    assert ctx.bytes_sent == 0


async def test_idle_timeout_changed_by_a_new_snapshot_applies_to_the_next_checkout(nursery):
    proxy, be, snap = await _setup(nursery, pool=ConnectionPool(idle_timeout_s=60.0))

    async def one_request() -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(b"GET /small HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            got = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    got += chunk
        return got

    assert (await one_request()).startswith(b"HTTP/1.1 200")
    clusters = dict(snap.clusters)
    clusters["svc"] = dataclasses.replace(clusters["svc"], connection_pool=ConnectionPool(idle_timeout_s=0.2))
    proxy.plane.holder.swap(dataclasses.replace(snap, version="2", clusters=clusters))
    await trio.sleep(0.6)  # idle past the new timeout, and under the 1 s after which a reuse peeks first
    assert (await one_request()).startswith(b"HTTP/1.1 200")
    assert be.connections == 2, "a connection idle past the new idleTimeout was reused"


async def test_local_reply_bodies_count_in_bytes_sent(nursery):
    """Envoy's BYTES_SENT counts the body of a reply the proxy made itself: a connect failure's 503
    (the route's cluster has nothing listening), and nothing for HEAD, whose reply has no body."""
    log = RecordingLog()
    snap = make_snapshot({"dead": [1]}, [prefix_route(b"/", {"dead": 100})])
    proxy = await start_proxy(nursery, snap, access_log=log)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        got = b""
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nHEAD / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                got += chunk
    first, _, second = got.partition(b"HTTP/1.1 503", )[2].partition(b"HTTP/1.1 503")
    body = first.partition(b"\r\n\r\n")[2]
    assert body.startswith(b"upstream connect error") and second.endswith(b"\r\n\r\n"), got
    assert [(ctx.request.method, ctx.status, ctx.bytes_sent) for ctx in log.contexts] == [
        (b"GET", 503, len(body)), (b"HEAD", 503, 0)]


async def test_a_malformed_head_reply_counts_its_body(nursery):
    log = RecordingLog()
    proxy, _, _ = await _setup(nursery, access_log=log)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 400") and got.endswith(b"\r\n\r\nBad Request"), got
    (ctx,) = log.contexts
    assert (ctx.status, ctx.bytes_sent) == (400, len(b"Bad Request"))
