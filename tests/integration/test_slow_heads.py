"""Parked request heads (reactor.py, "Parked reads"): a head that trickles in is read by the worker's
parked-queue task, and its connection's task wakes only for a complete, invalid or oversized head, the
client's end, or the header timeout. Real clients on 127.0.0.1 against the real data plane; every
test checks that the parked path was taken (`parked_reads`), so none of them passes by reading the
bytes the ordinary way."""

from __future__ import annotations

import gc
import json
import socket
import struct
import types

import trio

from proxy.l7.dataplane import HttpSettings
from proxy.l7.reactor import PARKED_BATCH
from tests.integration.backend import Backend
from tests.integration.l7_harness import make_snapshot, prefix_route, start_proxy

BYTE_GAP_S = 0.02  # between two sends of a trickled head: long enough for the proxy to read each alone


async def _setup(nursery, settings: HttpSettings | None = None):
    backend = await Backend("b").start(nursery)
    snapshot = make_snapshot({"svc": [backend.port]}, [prefix_route(b"/", {"svc": 100})])
    return await start_proxy(nursery, snapshot, settings), backend


async def _trickle(stream: trio.SocketStream, data: bytes, step: int = 1) -> None:
    for i in range(0, len(data), step):
        await stream.send_all(data[i:i + step])
        await trio.sleep(BYTE_GAP_S)


async def _read_responses(stream: trio.SocketStream, count: int, timeout_s: float = 5.0) -> list[bytes]:
    """`count` responses with content-length bodies, read off the stream in order."""
    got = b""
    responses = []
    with trio.fail_after(timeout_s):
        while len(responses) < count:
            head_end = got.find(b"\r\n\r\n")
            if head_end != -1:
                head = got[:head_end].lower()
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                end = head_end + 4 + length
                if len(got) >= end:
                    responses.append(got[:end])
                    got = got[end:]
                    continue
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {len(responses)} responses; unread {got[:200]!r}"
            got += chunk
    return responses


async def _read_until_closed(stream: trio.SocketStream, timeout_s: float) -> bytes:
    got = b""
    with trio.fail_after(timeout_s):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


async def test_a_trickled_head_with_a_pipelined_request_behind_it_gets_both_answers(nursery):
    proxy, backend = await _setup(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await _trickle(stream, b"GET /echo?first HTTP/1.1\r\nhost: svc\r\nx-slow: abcdef\r\n")
        # the end of the head and a whole second request in one segment: nothing may be lost
        await stream.send_all(b"\r\nGET /echo?second HTTP/1.1\r\nhost: svc\r\n\r\n")
        first, second = await _read_responses(stream, 2)
    assert proxy.plane.reactor.parked_reads >= 40
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    assert [r["target"] for r in backend.requests] == ["/echo?first", "/echo?second"]
    assert dict(backend.requests[0]["headers"])["x-slow"] == "abcdef"


async def test_a_body_after_a_trickled_head_arrives_whole(nursery):
    proxy, backend = await _setup(nursery)
    body = b"0123456789" * 50
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await _trickle(stream, b"POST /echo HTTP/1.1\r\nhost: svc\r\ncontent-length: %d\r\n" % len(body), step=3)
        await stream.send_all(b"\r\n" + body[:100])  # the head's end with the body's start, then the rest
        await trio.sleep(BYTE_GAP_S)
        await stream.send_all(body[100:])
        (response,) = await _read_responses(stream, 1)
        # a chunked body behind a second trickled head, on the same connection
        await _trickle(stream, b"POST /echo HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n", step=4)
        await stream.send_all(b"\r\n5\r\nhello\r\n")
        await _trickle(stream, b"6\r\n world\r\n0\r\n\r\n", step=5)
        (chunked,) = await _read_responses(stream, 1)
    assert proxy.plane.reactor.parked_reads >= 20
    assert json.loads(response.partition(b"\r\n\r\n")[2])["body"] == body.decode()
    assert json.loads(chunked.partition(b"\r\n\r\n")[2])["body"] == "hello world"
    assert [r["body"] for r in backend.requests] == [body.decode(), "hello world"]


async def test_a_client_that_closes_or_resets_while_parked_frees_its_connection_at_once(nursery):
    settings = HttpSettings(request_headers_timeout_s=30.0)
    proxy, backend = await _setup(nursery, settings)
    plane = proxy.plane
    for reset in (False, True):
        parked_before = plane.reactor.parked_reads
        sock = socket.socket()
        sock.setblocking(False)
        await trio.socket.from_stdlib_socket(sock).connect(("127.0.0.1", proxy.port))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        await _trickle(stream, b"GET /small HTTP/1.1\r\nhost: svc\r\n")
        assert plane.downstream_cx_active.value == 1
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        with trio.fail_after(2):  # long before the 30 s header timeout
            while plane.downstream_cx_active.value:
                await trio.sleep(0.01)
        assert plane.reactor.parked_reads > parked_before
    assert backend.requests == []
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 0
    assert proxy.counter("triomesh_downstream_rq_total", response_code="408") == 0


async def test_the_header_timeout_answers_408_while_parked(nursery):
    settings = HttpSettings(request_headers_timeout_s=0.5)
    proxy, backend = await _setup(nursery, settings)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        start = trio.current_time()
        await stream.send_all(b"GET /small HTTP/1.1\r\nhost: svc\r\n")
        await trio.sleep(BYTE_GAP_S)
        await _trickle(stream, b"x-slow: ")
        got = await _read_until_closed(stream, 5)
        elapsed_s = trio.current_time() - start
    assert proxy.plane.reactor.parked_reads >= 5
    assert got.startswith(b"HTTP/1.1 408") and b"connection: close" in got.lower(), got
    assert 0.45 < elapsed_s < 2.5
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 1
    assert proxy.counter("triomesh_downstream_rq_total", response_code="408") == 1
    assert backend.requests == []


def _ours(obj) -> bool:
    """An object of the proxy's code: an instance of its classes, one of its functions or frames."""
    if isinstance(obj, types.FrameType):
        return "/proxy/" in obj.f_code.co_filename
    if isinstance(obj, types.FunctionType):
        return (obj.__module__ or "").startswith("proxy.")
    return type(obj).__module__.startswith("proxy.")


async def test_connections_ended_by_the_header_timeout_leave_no_garbage_cycles(nursery):
    """Each closed connection is freed by reference counting, not left to the garbage collector,
    whose passes would otherwise land in the wave of 408s and reconnections."""
    settings = HttpSettings(request_headers_timeout_s=0.3)
    proxy, _ = await _setup(nursery, settings)
    count = 20
    gc.collect()
    gc.disable()  # an automatic pass would collect the cycles before the check below sees them
    try:
        streams = [await trio.open_tcp_stream("127.0.0.1", proxy.port) for _ in range(count)]
        for stream in streams:
            await stream.send_all(b"GET /small HTTP/1.1\r\nhost: svc\r\n")
        await trio.sleep(BYTE_GAP_S)
        for stream in streams:
            await stream.send_all(b"x-slow: a")  # parked: the socket was emptied by a short read
        for stream in streams:
            async with stream:
                assert (await _read_until_closed(stream, 5)).startswith(b"HTTP/1.1 408")
        with trio.fail_after(2):
            while proxy.plane.downstream_cx_active.value:
                await trio.sleep(0.01)
        assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == count
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            ours = [obj for obj in gc.garbage if _ours(obj)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        gc.enable()
    assert not ours, f"{len(ours)} objects left to the garbage collector, e.g. {ours[:5]}"


async def test_an_invalid_or_oversized_parked_head_is_answered_at_once(nursery):
    settings = HttpSettings(request_headers_timeout_s=30.0, max_head_bytes=2048)
    proxy, _ = await _setup(nursery, settings)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await _trickle(stream, b"GET /small HTTP/1.1\r\nhost: svc\r\nx-ok: 1\r\n")
        await _trickle(stream, b"bad")
        await stream.send_all(b" name")  # a space in a field name: invalid before the line ends
        got = await _read_until_closed(stream, 3)
    assert got.startswith(b"HTTP/1.1 400"), got
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await _trickle(stream, b"GET /small HTTP/1.1\r\nhost: svc\r\n")
        await stream.send_all(b"x-big: " + b"a" * 3000)  # past the limit, still no end of head
        got = await _read_until_closed(stream, 3)
    assert got.startswith(b"HTTP/1.1 431"), got
    assert proxy.plane.reactor.parked_reads >= 10
    assert proxy.counter("triomesh_downstream_rq_header_timeout_total") == 0


async def test_many_parked_heads_completed_together_are_all_served(nursery):
    """More heads finish in one moment than the parked-queue task reads per pass: none is left asleep.
    The sends are plain blocking calls with no checkpoint between them, so the proxy (in this same Trio
    loop) sees all of them in one poll."""
    proxy, backend = await _setup(nursery)
    count = 5 * PARKED_BATCH + 7
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", proxy.port)))
            await trio.lowlevel.checkpoint()  # the proxy accepts (its listen backlog is smaller than count)
        for sock in socks:
            sock.sendall(b"GET /small HTTP/1.1\r\n")
        await trio.sleep(0.3)  # every request line read: the connections are parked now
        for i, sock in enumerate(socks):
            sock.sendall(b"host: svc\r\nx-n: %d\r\n" % i)
        await trio.sleep(0.3)
        for sock in socks:
            sock.sendall(b"\r\n")
        for sock in socks:
            sock.setblocking(False)
            (response,) = await _read_responses(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), 1)
            assert response.startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    assert proxy.plane.reactor.parked_reads >= 2 * count
    assert len(backend.requests) == count
