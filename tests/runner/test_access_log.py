"""The access log: one JSON (or console) line per request with Envoy-like fields, nothing when off,
whole lines per write."""

from __future__ import annotations

import json
import os
import time

import pytest

from proxy.config.snapshot import Cluster, Endpoint
from proxy.l7.access_log import PIPE_BUF, AccessLog, _WallClockFormatter
from proxy.l7.context import RequestContext
from proxy.l7.events import RequestHead


def _ctx(*, path: bytes = b"/api/v1?x=1", flags: list[str] | None = None) -> RequestContext:
    head = RequestHead(b"GET", path, b"shop.example:8080", [(b"host", b"shop.example:8080")])
    ctx = RequestContext(None, None, "127.0.0.1:40123", head, start_monotonic=100.0, start_wall=1_764_057_601.25)
    ctx.status = 200
    ctx.bytes_received = 5
    ctx.bytes_sent = 1234
    ctx.upstream_host = "127.0.0.1:9001"
    ctx.cluster = Cluster("outbound|80|v1|shop", "shop", 80, "v1", (Endpoint("127.0.0.1", 9001),))
    ctx.request_id = b"8c3c2b6e-1f1a-4a57-9a55-2f0c1d0e4b7a"
    if flags:
        ctx.response_flags.extend(flags)
    return ctx


class _Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def read(self) -> bytes:
        try:
            return os.read(self.r, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def pipe():
    p = _Pipe()
    yield p
    p.close()


def test_json_line_has_every_field(pipe: _Pipe) -> None:
    log = AccessLog("json", fd=pipe.w, clock=lambda: 100.0123)
    assert log.enabled
    log.emit(_ctx())
    assert pipe.read() == b""  # buffered until flush (or a full pipe-sized chunk)
    log.flush()
    line = pipe.read()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record == {
        "event": "access",
        "level": "info",
        "timestamp": "2025-11-25T08:00:01.250Z",
        "method": "GET",
        "path": "/api/v1?x=1",
        "protocol": "HTTP/1.1",
        "authority": "shop.example:8080",
        "status": 200,
        "response_flags": "-",
        "upstream_host": "127.0.0.1:9001",
        "cluster": "outbound|80|v1|shop",
        "bytes_received": 5,
        "bytes_sent": 1234,
        "duration_ms": 12.3,
        "request_id": "8c3c2b6e-1f1a-4a57-9a55-2f0c1d0e4b7a",
        "downstream_remote_address": "127.0.0.1:40123",
    }


def test_worker_index_is_added_when_given(pipe: _Pipe) -> None:
    log = AccessLog("json", fd=pipe.w, clock=lambda: 100.0, worker=3)
    log.emit(_ctx())
    log.flush()
    assert json.loads(pipe.read())["worker"] == 3


def test_flags_and_missing_upstream(pipe: _Pipe) -> None:
    log = AccessLog("json", fd=pipe.w, clock=lambda: 100.0)
    ctx = _ctx(flags=["UF", "URX"])
    ctx.status = 503
    ctx.upstream_host = ""
    ctx.cluster = None
    ctx.request_id = b""
    log.emit(ctx)
    log.flush()
    record = json.loads(pipe.read())
    assert (record["status"], record["response_flags"], record["upstream_host"], record["cluster"],
            record["request_id"]) == (503, "UF,URX", "-", "-", "-")


def test_non_utf8_path_is_still_one_valid_line(pipe: _Pipe) -> None:
    log = AccessLog("json", fd=pipe.w, clock=lambda: 100.0)
    log.emit(_ctx(path=b'/\xff"\n'))
    log.flush()
    data = pipe.read()
    assert data.count(b"\n") == 1
    assert json.loads(data)["path"] == '/\xff"\n'


def test_off_writes_nothing(pipe: _Pipe) -> None:
    log = AccessLog("off", fd=pipe.w)
    assert not log.enabled
    for _ in range(1000):
        log.emit(_ctx())
    log.flush()
    assert pipe.read() == b""


def test_console_line(pipe: _Pipe) -> None:
    log = AccessLog("console", fd=pipe.w, clock=lambda: 100.5)
    log.emit(_ctx(flags=["NR"]))
    log.flush()
    text = pipe.read().decode()
    assert text.count("\n") == 1
    for part in ("access", "/api/v1?x=1", "status=200", "response_flags=NR", "duration_ms=500.0"):
        assert part in text, (part, text)


def test_lines_are_written_whole_in_pipe_sized_chunks() -> None:
    # a socketpair records write boundaries (each write below 4 KiB arrives as one recv on an idle pair)
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        log = AccessLog("json", fd=a.fileno(), clock=lambda: 100.0)
        n = 40  # ~18 KB: fits the socket buffer, so the writer never blocks on this idle reader
        for _ in range(n):
            log.emit(_ctx())
        log.flush()
        b.setblocking(False)
        writes = []
        while True:
            try:
                writes.append(b.recv(1 << 16))
            except BlockingIOError:
                break
    finally:
        a.close()
        b.close()
    assert len(writes) > 1
    assert all(len(w) <= PIPE_BUF and w.endswith(b"\n") for w in writes)
    lines = b"".join(writes).splitlines()
    assert len(lines) == n and all(json.loads(line)["status"] == 200 for line in lines)


def test_a_broken_fd_never_raises() -> None:
    r, w = os.pipe()
    os.close(r)  # writes now fail with EPIPE (SIGPIPE is ignored by Python)
    try:
        log = AccessLog("json", fd=w, clock=lambda: 100.0)
        log.emit(_ctx())
        log.flush()
        assert log.dropped_lines == 1
    finally:
        os.close(w)


def test_wall_clock_formatter_matches_strftime() -> None:
    fmt = _WallClockFormatter()
    for wall in (0.0, 1.999, 1_764_057_601.0, 1_764_057_601.0425, time.time()):
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(wall))) + f".{int((wall % 1) * 1000):03d}Z"
        assert fmt.format(wall) == expected


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="off"):
        AccessLog("xml")


def test_text_line_prints_a_dash_for_what_is_unknown(pipe: _Pipe) -> None:
    log = AccessLog("text", fd=pipe.w, clock=lambda: 100.5)
    ctx = _ctx(flags=["UF", "URX"])
    ctx.status = 503
    ctx.upstream_host = ""
    ctx.cluster = None
    ctx.request_id = b""
    log.emit(ctx)
    log.flush()
    assert pipe.read() == (b'[2025-11-25T08:00:01.250Z] "GET /api/v1?x=1 HTTP/1.1" 503 UF,URX - - "-" 5 1234 500 - '
                           b'"-" "-" "-" "shop.example:8080" "-" - - - 127.0.0.1:40123 - -\n')


def test_text_line_of_an_upstream_response(pipe: _Pipe) -> None:
    log = AccessLog("text", fd=pipe.w, clock=lambda: 100.0123)
    ctx = _ctx()
    ctx.request.headers += [(b"user-agent", b"curl/8.5.0"), (b"x-forwarded-for", b"10.0.0.1, 10.0.0.2")]
    ctx.original_destination = ("10.1.2.3", 8080)
    log.emit(ctx)
    log.flush()
    assert pipe.read() == (b'[2025-11-25T08:00:01.250Z] "GET /api/v1?x=1 HTTP/1.1" 200 - via_upstream - "-" 5 1234 12 - '
                           b'"10.0.0.1, 10.0.0.2" "curl/8.5.0" "8c3c2b6e-1f1a-4a57-9a55-2f0c1d0e4b7a" '
                           b'"shop.example:8080" "127.0.0.1:9001" outbound|80|v1|shop - 10.1.2.3:8080 '
                           b'127.0.0.1:40123 - -\n')


def test_off_writes_no_connection_line_either(pipe: _Pipe) -> None:
    from proxy.l7.access_log import ConnectionEntry

    log = AccessLog("off", fd=pipe.w)
    entry = ConnectionEntry("access", "info", "t", "tcp", "-", "-", "-", 0, 0, 0.0, "-", "-")
    log.emit_connection(entry)
    log.emit_connection(entry, text=True)
    log.flush()
    assert pipe.read() == b""


def test_a_connection_line_in_each_format(pipe: _Pipe) -> None:
    from proxy.l7.access_log import ConnectionEntry

    entry = ConnectionEntry("access", "info", "2025-11-25T08:00:01.250Z", "tcp", "UF", "127.0.0.1:9000",
                            "outbound|9000||echo", 3, 0, 1.5, "127.0.0.1:40000", "127.0.0.1:15443",
                            downstream_peer_principal="cluster.local/ns/shop/sa/web")
    console = AccessLog("console", fd=pipe.w)
    console.emit_connection(entry)
    console.flush()
    line = pipe.read().decode()
    assert line.count("\n") == 1 and "response_flags=UF" in line and "protocol=tcp" in line
    log = AccessLog("json", fd=pipe.w, worker=2)
    log.emit_connection(entry)
    log.flush()
    record = json.loads(pipe.read())
    assert (record["protocol"], record["response_flags"], record["worker"], record["downstream_peer_principal"]) == (
        "tcp", "UF", 2, "cluster.local/ns/shop/sa/web")
    text = AccessLog("text", fd=pipe.w)
    text.emit_connection(entry)
    text.flush()
    assert pipe.read() == (b'[2025-11-25T08:00:01.250Z] "- - -" 0 UF - - "-" 3 0 1 - "-" "-" "-" "-" "127.0.0.1:9000" '
                           b'outbound|9000||echo - 127.0.0.1:15443 127.0.0.1:40000 - -\n')
