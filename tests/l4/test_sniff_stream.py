"""The sniffing driver on real sockets: curl's own first bytes, silence, slow clients, replay."""

from __future__ import annotations

import socket
import subprocess

import trio

from proxy.l4.original_dst import TransparentConnection, open_listener, serve_transparent
from proxy.l4.sniff import Detection, Protocol
from proxy.l4.sniff_stream import PrefixedStream, sniff_socket, sniff_stream, socket_stream_with_prefix

from .harness import needs_tool

needs_curl = needs_tool("curl", "curl")


async def _sniff_one(client_job, *, timeout_s: float = 2.0) -> tuple[Detection, bytes]:  # noqa: ANN001
    """Listen on 127.0.0.1:0, run client_job(port), sniff the first connection it makes."""
    listener = open_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    send, receive = trio.open_memory_channel(1)

    async def handle(conn: TransparentConnection) -> None:
        await send.send(await sniff_socket(conn.sock, timeout_s=timeout_s))

    with listener, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_transparent, listener, handle)
            nursery.start_soon(client_job, port)
            result = await receive.receive()
            nursery.cancel_scope.cancel()
    return result


def _curl(*args: str):  # noqa: ANN202
    async def job(port: int) -> None:
        argv = ["curl", "-s", "-o", "/dev/null", "--max-time", "3", *(a.format(port=port) for a in args)]
        await trio.run_process(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return job


@needs_curl
async def test_curl_https_client_hello() -> None:
    detection, raw = await _sniff_one(
        _curl("-k", "--http2", "--resolve", "svc.mesh.test:{port}:127.0.0.1", "https://svc.mesh.test:{port}/")
    )
    assert detection == Detection(Protocol.TLS, sni="svc.mesh.test", alpn=("h2", "http/1.1"))
    assert raw[0] == 0x16


@needs_curl
async def test_curl_http1_request() -> None:
    detection, raw = await _sniff_one(_curl("http://127.0.0.1:{port}/reviews/1"))
    assert detection == Detection(Protocol.HTTP1, http_method=b"GET", http_version=b"1.1")
    assert raw.startswith(b"GET /reviews/1 HTTP/1.1\r\n")


@needs_curl
async def test_curl_h2_prior_knowledge() -> None:
    detection, raw = await _sniff_one(_curl("--http2-prior-knowledge", "http://127.0.0.1:{port}/"))
    assert detection.protocol is Protocol.HTTP2
    assert raw.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


async def test_server_first_protocol_times_out_as_opaque() -> None:
    async def silent_client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)):
            await trio.sleep(1.0)

    started = trio.current_time()
    detection, raw = await _sniff_one(silent_client, timeout_s=0.1)
    assert detection.protocol is Protocol.OPAQUE and raw == b""
    assert trio.current_time() - started < 0.9  # decided by the sniff timeout, not by the client leaving


async def test_slow_client_is_read_until_decided() -> None:
    async def dribbling_client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for piece in (b"PRI * HT", b"TP/2.0\r\n\r\n", b"SM\r\n\r\n"):
                sock.sendall(piece)
                await trio.sleep(0.02)
            await trio.sleep(1.0)

    detection, raw = await _sniff_one(dribbling_client, timeout_s=0.5)
    assert detection.protocol is Protocol.HTTP2
    assert raw == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_client_closing_early_decides_on_what_it_sent() -> None:
    async def closing_client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /partial")

    detection, raw = await _sniff_one(closing_client)
    assert detection == Detection(Protocol.HTTP1, http_method=b"GET")
    assert raw == b"GET /partial"


async def test_prefixed_stream_replays_sniffed_bytes() -> None:
    request = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
    a, b = trio.socket.socketpair()
    client, server = trio.SocketStream(a), trio.SocketStream(b)
    async with client, server:
        await client.send_all(request)
        await client.send_eof()
        detection, sniffed = await sniff_stream(server, timeout_s=1.0)
        assert detection.protocol is Protocol.HTTP1 and 0 < len(sniffed) < len(request)
        replay = PrefixedStream(server, sniffed)
        received = bytearray()
        with trio.fail_after(5):
            while chunk := await replay.receive_some(1000):
                received += chunk
        assert bytes(received) == request
        assert replay.buffered_bytes() == 0
        await replay.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert await client.receive_some() == b"HTTP/1.1 204 No Content\r\n\r\n"


async def test_sniffed_raw_socket_handed_to_a_stream_handler() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    with a:
        a.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        a.shutdown(socket.SHUT_WR)
        detection, sniffed = await sniff_socket(b, timeout_s=1.0)
        assert detection.protocol is Protocol.HTTP1
        stream = socket_stream_with_prefix(b, sniffed)
        async with stream:
            with trio.fail_after(5):
                received = b""
                while chunk := await stream.receive_some():
                    received += chunk
            assert received == b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
            await stream.send_all(b"ok")
        assert a.recv(10) == b"ok"
