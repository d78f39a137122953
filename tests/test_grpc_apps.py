"""The gRPC test apps on their own (no proxy): real sockets on 127.0.0.1, grpcio on both sides."""

from __future__ import annotations

import socket
import time
from functools import partial

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio

from tests import grpc_apps
from tests.grpc_apps import GrpcResult, start_grpc_server, stream_message


@pytest.fixture
def server():
    srv, port = start_grpc_server(name="grpc-a")
    assert port == srv.port > 0
    with srv:
        yield srv


@pytest.fixture
def target(server):
    return server.address


def test_unary_echo_with_metadata(server, target):
    r = grpc_apps.unary(target, b"hello", metadata=[("x-request-id", "req-1")], timeout=5)
    assert isinstance(r, GrpcResult)
    assert r.ok and r.code is grpc.StatusCode.OK
    assert r.response == b"grpc-a:hello"
    assert r.initial("x-request-id") == "req-1"
    assert r.trailing("x-served-by") == "grpc-a"
    assert server.calls() == 1 and server.calls("Unary") == 1 and server.calls(grpc_apps.BIDI) == 0
    assert server.records[0].get("x-request-id") == "req-1"


def test_unary_without_request_id_has_no_echo(target):
    r = grpc_apps.unary(target, b"", timeout=5)
    assert r.response == b"grpc-a:"
    assert r.initial("x-request-id") is None


def test_client_stream_counts(server, target):
    r = grpc_apps.client_stream(target, [b"a", b"bc", b"", b"x" * 1000], timeout=5)
    assert r.ok
    assert r.response == b"4:1003"
    assert r.trailing("x-served-by") == "grpc-a"
    assert server.calls("ClientStream") == 1


def test_server_stream(server, target):
    r = grpc_apps.server_stream(target, 5, 10, metadata=[("x-request-id", "s")], timeout=5)
    assert r.ok
    assert r.response == [stream_message(i, 10) for i in range(5)]
    assert all(len(m) == 10 for m in r.response)
    assert r.initial("x-request-id") == "s"
    assert r.trailing("x-served-by") == "grpc-a"


def test_server_stream_bad_request(target):
    r = grpc_apps.server_stream_raw(target, b"nonsense", timeout=5)
    assert r.code is grpc.StatusCode.INVALID_ARGUMENT
    assert r.response == []


def test_server_stream_4mb_messages(target):
    size = 4 * 1024 * 1024
    r = grpc_apps.server_stream(target, 2, size, timeout=10)
    assert r.ok, r
    assert [len(m) for m in r.response] == [size, size]
    assert r.response == [stream_message(0, size), stream_message(1, size)]


def test_bidi_interleaves(server, target):
    messages = [b"one", b"two", b"three" * 100]
    r, events = grpc_apps.bidi_interleaved(target, messages, timeout=5)
    assert r.ok
    assert r.response == messages
    assert events == ["send 0", "recv 0", "send 1", "recv 1", "send 2", "recv 2"]
    assert r.trailing("x-served-by") == "grpc-a"
    assert server.calls("Bidi") == 1


def test_bidi_not_lockstep(target):
    messages = [b"%d" % i for i in range(50)]
    r = grpc_apps.bidi(target, messages, lockstep=False, timeout=5)
    assert r.ok and r.response == messages


@pytest.mark.parametrize("number, code", [(7, grpc.StatusCode.PERMISSION_DENIED),
                                          (14, grpc.StatusCode.UNAVAILABLE),
                                          (13, grpc.StatusCode.INTERNAL)])
def test_fail_status(server, target, number, code):
    r = grpc_apps.unary(target, b"x", metadata=[("x-fail-status", str(number))], timeout=5)
    assert r.code is code and grpc_apps.status_code(number) is code
    assert r.details == "failed on purpose"
    assert r.response is None
    assert r.trailing("x-served-by") == "grpc-a"
    assert server.calls() == 1


def test_fail_status_on_streams(target):
    md = [("x-fail-status", "9")]
    for r in (grpc_apps.client_stream(target, [b"a"], metadata=md, timeout=5),
              grpc_apps.server_stream(target, 3, 3, metadata=md, timeout=5),
              grpc_apps.bidi(target, [b"a"], metadata=md, timeout=5)):
        assert r.code is grpc.StatusCode.FAILED_PRECONDITION
        assert r.details == "failed on purpose"
        assert r.trailing("x-served-by") == "grpc-a"


def test_failure_is_trailers_only_with_request_id_in_trailers(target):
    md = [("x-fail-status", "14"), ("x-request-id", "f-1")]
    r = grpc_apps.unary(target, b"x", metadata=md, timeout=5)
    assert r.code is grpc.StatusCode.UNAVAILABLE
    assert r.initial_metadata == ()
    assert r.trailing("x-request-id") == "f-1" and r.trailing("x-served-by") == "grpc-a"


def _raw_h2_call(port: int, metadata: list[tuple[str, str]], wait_s: float):
    """One Unary call over a bare h2 connection: returns the h2 events seen in the first
    `wait_s` seconds and those seen until the stream ended (so tests can check the wire shape)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", grpc_apps.UNARY),
                   (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                   ("te", "trailers"), *metadata]
        conn.send_headers(1, headers)
        conn.send_data(1, b"\x00\x00\x00\x00\x01x", end_stream=True)
        sock.sendall(conn.data_to_send())
        early: list = []
        late: list = []
        deadline = time.monotonic() + wait_s
        ended = False
        while not ended:
            now = time.monotonic()
            bucket = early if now < deadline else late
            sock.settimeout(max(deadline - now, 0.01) if now < deadline else 5)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "server closed the connection"
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", 0) == 1:
                    bucket.append(event)
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                    ended = True
            sock.sendall(conn.data_to_send())
        return early, late


def test_delayed_call_sends_no_headers_before_the_delay(server):
    early, late = _raw_h2_call(server.port, [("x-delay-ms", "400"), ("x-request-id", "d-1")], 0.2)
    assert early == []
    first = late[0]
    assert isinstance(first, h2.events.ResponseReceived)
    assert (b"x-request-id", b"d-1") in first.headers


def test_failure_on_the_wire_is_one_headers_frame(server):
    early, late = _raw_h2_call(server.port, [("x-fail-status", "14")], 0.0)
    events = early + late
    assert isinstance(events[0], h2.events.ResponseReceived)
    assert isinstance(events[1], h2.events.StreamEnded)
    fields = dict(events[0].headers)
    assert fields[b"grpc-status"] == b"14" and fields[b"grpc-message"] == b"failed on purpose"
    assert fields[b"x-served-by"] == b"grpc-a"


def test_bad_fail_status_is_invalid_argument(target):
    r = grpc_apps.unary(target, b"x", metadata=[("x-fail-status", "99")], timeout=5)
    assert r.code is grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_exceeded_with_delay(server, target):
    start = time.monotonic()
    r = grpc_apps.unary(target, b"slow", metadata=[("x-delay-ms", "3000")], timeout=0.2)
    elapsed = time.monotonic() - start
    assert r.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5
    assert server.calls() == 1
    # a delay shorter than the deadline just delays
    r = grpc_apps.unary(target, b"slow", metadata=[("x-delay-ms", "50")], timeout=5)
    assert r.ok and r.response == b"grpc-a:slow"


def test_fail_times_then_success(server, target):
    md = [("x-fail-times", "2"), ("x-fail-key", "k1")]
    codes = [grpc_apps.unary(target, b"r", metadata=md, timeout=5) for _ in range(3)]
    assert [c.code for c in codes] == [grpc.StatusCode.UNAVAILABLE] * 2 + [grpc.StatusCode.OK]
    assert codes[0].details == "failed on purpose"
    assert codes[2].response == b"grpc-a:r"
    # another key has its own counter
    other = grpc_apps.unary(target, b"r", metadata=[("x-fail-times", "1"), ("x-fail-key", "k2")],
                            timeout=5)
    assert other.code is grpc.StatusCode.UNAVAILABLE
    assert server.calls("Unary") == 4
    server.reset()
    assert server.calls() == 0
    assert grpc_apps.unary(target, b"r", metadata=md, timeout=5).code is grpc.StatusCode.UNAVAILABLE


def test_fail_times_counters_are_per_server():
    a, _ = start_grpc_server(name="grpc-a")
    b, _ = start_grpc_server(name="grpc-b")
    with a, b:
        md = [("x-fail-times", "1"), ("x-fail-key", "same")]
        assert grpc_apps.unary(a.address, b"", metadata=md, timeout=5).code.name == "UNAVAILABLE"
        rb = grpc_apps.unary(b.address, b"", metadata=md, timeout=5)
        assert rb.code.name == "UNAVAILABLE" and rb.trailing("x-served-by") == "grpc-b"
        assert grpc_apps.unary(b.address, b"", metadata=md, timeout=5).response == b"grpc-b:"


def test_authority_option_is_accepted(target):
    r = grpc_apps.unary(target, b"h", authority="echo.default.svc.cluster.local", timeout=5)
    assert r.ok and r.response == b"grpc-a:h"


def test_unreachable_target_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = grpc_apps.unary(f"127.0.0.1:{port}", b"x", timeout=5)
    assert r.code is grpc.StatusCode.UNAVAILABLE


def test_http_proxy_env_is_ignored(monkeypatch, target):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("grpc_proxy", "http://127.0.0.1:9")
    assert grpc_apps.unary(target, b"p", timeout=5).ok


async def test_concurrent_calls_from_trio_threads(server, target):
    results: list[GrpcResult] = []

    async def one(i: int) -> None:
        md = [("x-request-id", f"id-{i}"), ("x-delay-ms", "100")]
        results.append(await trio.to_thread.run_sync(
            partial(grpc_apps.unary, target, b"%d" % i, metadata=md, timeout=5)))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(one, i)
    assert trio.current_time() - start < 1.5  # ran in parallel, not 16 x 100 ms
    assert sorted(r.response for r in results) == sorted(b"grpc-a:%d" % i for i in range(16))
    assert all(r.initial("x-request-id") == f"id-{r.response.decode().split(':')[1]}"
               for r in results)
    assert server.calls() == 16
