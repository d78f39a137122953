"""Resource exhaustion is an answer, not a silent close: a real proxy with a low RLIMIT_NOFILE under
a bounded burst, the overload manager's connection limit and memory watermark, and the pure parts
(accept back-off, errno classification, watermark decision)."""

from __future__ import annotations

import errno
import selectors
import socket
import time

import pytest

from proxy.accept_backoff import FIRST_DELAY_S, LOG_INTERVAL_S, MAX_DELAY_S, AcceptBackoff
from proxy.exhaustion import exhaustion_reason
from proxy.overload import MemoryWatermark, rss_bytes
from proxy.stats import Stats
from tests.runner.harness import Backend, Proxy, free_port, get, mesh_config

# --- pure parts -------------------------------------------------------------------------------------


def test_accept_backoff_doubles_to_one_second_and_resets_on_success():
    now = [0.0]
    backoff = AcceptBackoff(clock=lambda: now[0])
    delays = [backoff.failed().delay_s for _ in range(12)]
    assert delays[:3] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S]
    assert delays[-1] == MAX_DELAY_S and max(delays) == MAX_DELAY_S
    backoff.succeeded()
    assert backoff.failed().delay_s == FIRST_DELAY_S


def test_accept_backoff_logs_once_per_interval_with_the_suppressed_count():
    now = [100.0]
    backoff = AcceptBackoff(clock=lambda: now[0])
    first = backoff.failed()
    assert first.log and first.suppressed == 0
    for _ in range(7):
        now[0] += 0.1
        assert not backoff.failed().log
    now[0] += LOG_INTERVAL_S
    later = backoff.failed()
    assert later.log and later.suppressed == 7


@pytest.mark.parametrize(("err", "reason"), [(errno.EMFILE, "emfile"), (errno.ENFILE, "enfile"),
                                             (errno.ENOMEM, "enomem"), (errno.ENOBUFS, "enobufs"),
                                             (errno.EADDRNOTAVAIL, "eaddrnotavail"), (errno.ECONNREFUSED, None),
                                             (None, None)])
def test_exhaustion_reason(err, reason):
    assert exhaustion_reason(err) == reason


def test_memory_watermark_follows_the_samples():
    stats = Stats()
    watermark = MemoryWatermark(1000, stats)
    assert watermark.update(1001) is True
    assert stats.gauge("triomesh_overload_memory_active").value == 1
    assert watermark.update(1000) is False
    assert stats.gauge("triomesh_overload_memory_active").value == 0
    assert rss_bytes() > 1 << 20  # this very interpreter: a real read of /proc/self/statm


# --- real processes ---------------------------------------------------------------------------------


@pytest.fixture
def backends():
    v1, v2 = Backend("v1"), Backend("v2")
    yield v1, v2
    v1.close()
    v2.close()


def _proxy(tmp_path, backends, **kw) -> tuple[Proxy, int]:
    port = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config(port, backends[0].port, backends[1].port))
    proxy = Proxy(config, tmp_path, concurrency=1, **kw).start()
    return proxy, port


def _burst(port: int, count: int, path: str, max_s: float) -> list[int | None]:
    """`count` connections at once, one `connection: close` request on each; the status each one got,
    None for a connection closed (or reset) without a response. Bounded by `max_s`."""
    request = f"GET {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n".encode()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(request)
        s.setblocking(False)
        socks.append(s)
    received = {s: b"" for s in socks}
    done: dict[socket.socket, bool] = {}
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + max_s
    while len(done) < count and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                received[s] += data
            else:
                done[s] = True
                selector.unregister(s)
    selector.close()
    statuses = []
    for s in socks:
        head = received[s]
        statuses.append(int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None)
        s.close()
    assert len(done) == count, f"{count - len(done)} connections neither answered nor closed within {max_s}s"
    return statuses


def test_descriptor_exhaustion_is_answered_503_counted_and_logged_never_a_silent_close(tmp_path, backends):
    """nofile 256, 600 connections each holding an upstream request for half a second: the proxy
    runs out of descriptors; every request gets an answer (200, or 503 UF when no upstream socket
    could be made), the 503s are in the stats and the access log, the accept loop logs its back-off
    rarely, and the proxy serves normally after the burst."""
    proxy, port = _proxy(tmp_path, backends, nofile=256)
    try:
        statuses = _burst(port, 600, "/delay/0.5", max_s=60)
        assert None not in statuses, f"{statuses.count(None)} connections closed without a response"
        assert set(statuses) <= {200, 503}, set(statuses)
        answered_503 = statuses.count(503)
        assert answered_503 > 0, "the burst never ran the proxy out of descriptors: the test proves nothing"
        assert statuses.count(200) > 0

        local_fail = proxy.stats("triomesh_upstream_cx_local_fail_total")
        assert local_fail.get((("reason", "emfile"),), 0) >= answered_503
        accept_errors = proxy.stats("triomesh_listener_accept_errors_total")
        assert sum(accept_errors.values()) > 0
        # after the burst: the proxy serves again
        assert get(port, "/after")[0] == 200

        def access_lines():  # the access log is flushed every second: wait for the burst's lines
            lines = [r for r in proxy.log_records() if "response_flags" in r and r["path"] == "/delay/0.5"]
            return lines if len(lines) >= len(statuses) else None

        access = proxy.wait_for(access_lines, "an access log line for every request of the burst")
        records = proxy.log_records()
        answered_by_log = [r for r in access if r["status"] == 503]
        assert len(access) == len(statuses) and len(answered_by_log) == answered_503
        assert all("UF" in r["response_flags"].split(",") for r in answered_by_log)
        assert not [r for r in access if r["status"] == 0], "a request ended without a response"
        warnings = [r for r in records if r.get("event") == "accept failed, backing off"]
        assert 1 <= len(warnings) <= 3, len(warnings)
        # the endpoints did nothing wrong: no outlier ejection on our own exhaustion
        assert sum(proxy.stats("triomesh_outlier_ejections_total").values()) == 0
    finally:
        proxy.stop()


def test_connections_past_the_limit_are_closed_at_once_and_counted(tmp_path, backends):
    proxy, port = _proxy(tmp_path, backends, extra_args=["--max-downstream-connections", "4"])
    kept = []
    try:
        request = b"GET /kept HTTP/1.1\r\nhost: backend\r\n\r\n"
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            kept.append(s)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                try:
                    extra.sendall(request)
                    assert extra.recv(65536) == b""  # closed at once, no response
                except ConnectionResetError:
                    pass
        rejected = proxy.stats("triomesh_downstream_cx_overload_reject_total")
        assert sum(rejected.values()) == 3
        for s in kept:  # the first ones keep working
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        kept.pop().close()
        proxy.wait_for(lambda: proxy.stats("triomesh_downstream_cx_active").get((), 0) == 3, "a slot freed")
        assert get(port, "/freed")[0] == 200  # room again for a new connection
    finally:
        for s in kept:
            s.close()
        proxy.stop()


def test_memory_above_the_limit_sheds_new_requests_with_503_overloaded(tmp_path, backends):
    """A limit of 1 MiB, which no Python worker fits in: every new request is shed, answered 503
    with x-envoy-overloaded and flagged OM, without reaching the backend."""
    proxy, port = _proxy(tmp_path, backends, extra_args=["--max-worker-rss", "1Mi"])
    try:
        proxy.wait_for(lambda: proxy.stats("triomesh_overload_memory_active").get((), 0) == 1, "the watermark")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /shed HTTP/1.1\r\nhost: backend\r\n\r\n")
            head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"x-envoy-overloaded: true" in head.lower()
        assert sum(proxy.stats("triomesh_overload_rq_shed_total").values()) == 1
        assert sum(proxy.stats("triomesh_upstream_rq_total").values()) == 0
        shed = proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("path") == "/shed"],
                              "the access log line (flushed every second)")
        assert [(r["status"], r["response_flags"]) for r in shed] == [(503, "OM")]
    finally:
        proxy.stop()
