"""Hot restart of a real `triomesh proxy` serving HTTP/2 with prior knowledge (h2c) on a Gateway
HTTP server: h2load's streams lose nothing, the old proxy sends GOAWAY, drains and exits."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import pytest

from tests.runner.harness import get
from tests.runner.test_hot_restart import _events, _total, _wait_exit, mesh  # noqa: F401 - the fixture

H2LOAD_CONNECTIONS = 16
H2LOAD_STREAMS = 10
H2LOAD_DURATION_S = 8


def _idle_h2_connection(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    """An h2c connection with one finished request, then idle: what a drain must send GOAWAY to."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [(":method", "GET"), (":path", "/idle"), (":scheme", "http"),
                                  (":authority", "gw")], end_stream=True)
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(65536)
        assert data, "closed before the first response"
        events = conn.receive_data(data)
        sock.sendall(conn.data_to_send())
        if any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in events):
            return sock, conn


def _wait_goaway(sock: socket.socket, conn: h2.connection.H2Connection, timeout_s: float) -> h2.events.ConnectionTerminated | None:
    sock.settimeout(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            return None
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
    return None


def test_h2c_under_h2load_loses_nothing_and_the_old_proxy_sends_goaway(mesh) -> None:  # noqa: F811
    if shutil.which("h2load") is None:
        pytest.fail("h2load (Debian nghttp2-client) is missing: make test installs it")
    start, port, _, _ = mesh
    old = start(concurrency=2)
    idle = _idle_h2_connection(port)
    # bounded: 16 connections x 10 streams for 8 s (h2load stops at the duration)
    load = subprocess.Popen(["h2load", "-c", str(H2LOAD_CONNECTIONS), "-m", str(H2LOAD_STREAMS),
                             "-D", str(H2LOAD_DURATION_S), "--warm-up-time", "0",
                             f"http://127.0.0.1:{port}/h2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(2.0)
        new = start(concurrency=2, wait_ready=False)
        goaway = _wait_goaway(*idle, timeout_s=15)
        assert _wait_exit(old) == 0, old.log_text()[-3000:]
        out = load.communicate(timeout=H2LOAD_DURATION_S + 30)[0].decode()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
        idle[0].close()
    assert goaway is not None and goaway.error_code == 0, goaway  # NO_ERROR: a graceful GOAWAY
    summary = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                        r"(\d+) errored, (\d+) timeout", out)
    assert summary, out
    _requested, _started, done, succeeded, failed, errored, timeout = map(int, summary.groups())
    assert timeout == 0, out
    # h2load counts as failed the requests it still meant to start on a connection that got the
    # drain's GOAWAY: nghttp2 opens no new stream after one, and h2load does not move them to a new
    # connection ("Process Request Failure"). Those never reach a proxy; a client that reconnects
    # sends them. Anything else failing (a reset stream, a 5xx) is a loss.
    if failed or errored:
        assert "Process Request Failure" in out and failed == errored, out
        assert failed <= H2LOAD_CONNECTIONS * H2LOAD_STREAMS, out
    assert succeeded == done - failed and succeeded > 1000, out
    assert re.search(r"status codes: \d+ 2xx, 0 3xx, 0 4xx, 0 5xx", out), out
    assert "hot_restart_draining" in _events(old) and _events(old)[-1] == "stopped"
    # the proxies' side of the same count: every request either proxy received (the old one's final
    # counters are carried into the new one) is one h2load got a 2xx for, or the idle connection's;
    # so the requests h2load counted as failed never reached a proxy
    new.wait_for(lambda: "hot_restart_counters_carried" in _events(new), "the old proxy's final counters", 30)
    assert _total(new, "triomesh_downstream_rq_total") == succeeded + 1, out
    assert _total(new, "istio_requests_total") == succeeded + 1, out
    # the new proxy serves the handed-over socket, HTTP/1.1 and h2c alike
    assert get(port, "/after") == (200, "v1 /after")
    assert "hot_restart_complete" in _events(new)
    fresh = _idle_h2_connection(port)
    fresh[0].close()
