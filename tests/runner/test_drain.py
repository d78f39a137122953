"""Graceful drain of a real `triomesh proxy` process tree: SIGTERM, POST /drain_listeners?graceful and
POST /quitquitquit with requests in flight (HTTP/1.1 and h2c), against a backend that answers late."""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.runner.harness import Backend, Proxy, free_port, mesh_config

IN_FLIGHT = 16


@pytest.fixture
def gateway(tmp_path: Path):
    """(start(drain_duration) -> Proxy, gateway port); every proxy is stopped by PID afterwards."""
    backend = Backend("v1")
    port = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config(port, backend.port, backend.port))
    started: list[Proxy] = []

    def start(drain_duration: str) -> Proxy:
        proxy = Proxy(config, tmp_path, concurrency=2, extra_args=["--drain-duration", drain_duration])
        started.append(proxy)
        return proxy.start()

    yield start, port
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(timeout=5)
    backend.close()


class Slow:
    """One request per thread, each on its own connection: (status, connection header) or the error."""

    def __init__(self, port: int, path: str, n: int) -> None:
        self.results: list[tuple[int, str | None] | str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(port, path)) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, port: int, path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            result: tuple[int, str | None] | str = (resp.status, resp.getheader("connection"))
        except Exception as e:  # noqa: BLE001 - a reset is an expected outcome in one test
            result = type(e).__name__
        finally:
            conn.close()
        with self._lock:
            self.results.append(result)

    def join(self, timeout_s: float) -> None:
        for t in self._threads:
            t.join(timeout_s)
        assert not any(t.is_alive() for t in self._threads)


def _active(proxy: Proxy) -> float:
    return sum(proxy.stats("triomesh_downstream_cx_active").values())


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # queued in the backlog just as the listener closed: not served either
        return True
    return False


def _wait_exit(proxy: Proxy, timeout_s: float) -> tuple[int, float]:
    """(exit status, seconds it took)."""
    t0 = time.monotonic()
    code = proxy.proc.wait(timeout=timeout_s)
    return code, time.monotonic() - t0


def test_sigterm_lets_requests_in_flight_finish_with_connection_close_and_exits_once_idle(gateway) -> None:
    start, port = gateway
    proxy = start("10s")
    requests = Slow(port, "/delay/1", IN_FLIGHT)
    proxy.wait_for(lambda: _active(proxy) == IN_FLIGHT, "16 requests in flight", timeout_s=5)
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    # the signal is delivered asynchronously: /ready turns 503 as soon as the supervisor handles it
    proxy.wait_for(lambda: proxy.admin("/ready")[0] == 503, "/ready 503", timeout_s=0.5)
    proxy.wait_for(lambda: _refused(port), "new connections refused", timeout_s=1)
    refused_after_s = time.monotonic() - t0
    assert not requests.results  # all of this while the requests were in flight
    requests.join(5)
    assert requests.results == [(200, "close")] * IN_FLIGHT
    code, _ = _wait_exit(proxy, 10)
    exited_after_s = time.monotonic() - t0
    assert code == 0
    assert refused_after_s < 0.9  # refused while the requests were still in flight
    assert exited_after_s < 3.0, exited_after_s  # once idle, far before the 10 s drain duration
    events = [r["event"] for r in proxy.log_records()]
    assert events.count("worker_drained") >= 2 and "worker_drain_deadline" not in events


def test_drain_deadline_resets_what_outlives_it_and_exits(gateway) -> None:
    start, port = gateway
    proxy = start("500ms")
    quick = Slow(port, "/delay/0.2", 2)
    late = Slow(port, "/delay/3", 1)
    proxy.wait_for(lambda: _active(proxy) == 3, "3 requests in flight", timeout_s=5)
    proxy.signal(signal.SIGTERM)
    code, took_s = _wait_exit(proxy, 10)
    assert code == 0
    assert 0.4 < took_s < 2.5, took_s  # at the deadline, not when the late response would come
    quick.join(5)
    late.join(5)
    assert quick.results == [(200, "close")] * 2
    assert late.results in (["ConnectionResetError"], ["RemoteDisconnected"]), late.results
    deadline = [r for r in proxy.log_records() if r["event"] == "worker_drain_deadline"]
    assert sum(r["reset_connections"] for r in deadline) == 1


def test_h2c_streams_in_flight_get_goaway_and_complete(gateway) -> None:
    if shutil.which("nghttp") is None:
        pytest.fail("nghttp (Debian nghttp2-client) is missing: make test installs it")
    start, port = gateway
    proxy = start("10s")
    # nghttp: prior-knowledge h2c, four concurrent streams on one connection, every frame printed;
    # they last past the final GOAWAY, which follows the shutdown notice by a second
    client = subprocess.Popen(["nghttp", "-nv", "-m", "4", f"http://127.0.0.1:{port}/delay/1.6"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proxy.wait_for(lambda: _active(proxy) == 1, "the h2c connection", timeout_s=5)
        time.sleep(0.2)  # the four streams reach the backend
        proxy.signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=5)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, out
    requested = sorted(int(sid) for sid in re.findall(r"send HEADERS frame <.*stream_id=(\d+)>", out))
    assert len(requested) == 4, out
    goaway = re.findall(r"recv GOAWAY frame .*\n.*last_stream_id=(\d+), error_code=(\w+)", out)
    # first the shutdown notice (the largest stream id: streams on their way are still served), then
    # the final GOAWAY naming the last stream accepted
    assert goaway == [("2147483647", "NO_ERROR"), (str(requested[-1]), "NO_ERROR")], out
    answered = sorted(int(sid) for sid in re.findall(r"recv \(stream_id=(\d+)\) :status: 200", out))
    assert answered == requested, out
    assert out.index("recv GOAWAY") < out.index(":status: 200"), out  # GOAWAY while they were in flight
    assert len(re.findall(r"recv DATA frame .*flags=0x01, stream_id=\d+>", out)) == 4, out  # END_STREAM each
    code, _ = _wait_exit(proxy, 10)
    assert code == 0


def test_drain_listeners_graceful_skip_exit_stays_up_not_ready_then_sigterm_exits(gateway) -> None:
    start, port = gateway
    proxy = start("10s")
    requests = Slow(port, "/delay/0.5", 4)
    proxy.wait_for(lambda: _active(proxy) == 4, "4 requests in flight", timeout_s=5)
    assert proxy.admin("/drain_listeners?graceful&skip_exit", method="POST") == (200, "OK\n")
    assert proxy.admin("/ready")[0] == 503
    proxy.wait_for(lambda: _refused(port), "new connections refused", timeout_s=1)
    requests.join(5)
    assert requests.results == [(200, "close")] * 4
    proxy.wait_for(lambda: all(w["pid"] is None for w in proxy.config_dump()["workers"]), "workers drained",
                   timeout_s=5)
    assert proxy.proc.poll() is None  # skip_exit: the admin still answers
    assert proxy.admin("/ready")[0] == 503
    assert sum(proxy.stats("triomesh_draining").values()) == 1
    assert sum(proxy.stats("triomesh_drain_cx_reset_total").values()) == 0
    assert sum(proxy.stats("triomesh_worker_restarts_total").values()) == 0
    proxy.signal(signal.SIGTERM)
    code, took_s = _wait_exit(proxy, 5)
    assert code == 0 and took_s < 1.0


def test_drain_listeners_needs_post_and_refuses_inboundonly(gateway) -> None:
    start, _ = gateway
    proxy = start("1s")
    assert proxy.admin("/drain_listeners?graceful")[0] == 405
    assert proxy.admin("/quitquitquit")[0] == 405
    assert proxy.admin("/drain_listeners?inboundonly&graceful", method="POST")[0] == 400
    assert proxy.admin("/ready")[0] == 200  # none of these started a drain


@pytest.mark.parametrize("path", ["/quitquitquit", "/drain_listeners?graceful"])
def test_quitquitquit_and_drain_listeners_graceful_drain_and_exit(gateway, path: str) -> None:
    start, port = gateway
    proxy = start("10s")
    requests = Slow(port, "/delay/0.5", 4)
    proxy.wait_for(lambda: _active(proxy) == 4, "4 requests in flight", timeout_s=5)
    assert proxy.admin(path, method="POST") == (200, "OK\n")
    assert proxy.admin("/ready")[0] == 503
    requests.join(5)
    assert requests.results == [(200, "close")] * 4
    code, took_s = _wait_exit(proxy, 5)
    assert code == 0 and took_s < 3.0


def test_idle_keepalive_connection_is_closed_by_the_drain(gateway) -> None:
    start, port = gateway
    proxy = start("10s")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("connection") is None  # kept alive
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert conn.sock.recv(1) == b""  # closed by the proxy, not left until the deadline
    code, _ = _wait_exit(proxy, 5)
    assert code == 0 and time.monotonic() - t0 < 2.0
    conn.close()


def test_a_second_sigterm_cuts_the_drain_short(gateway) -> None:
    start, port = gateway
    proxy = start("10s")
    late = Slow(port, "/delay/3", 1)
    proxy.wait_for(lambda: _active(proxy) == 1, "a request in flight", timeout_s=5)
    proxy.signal(signal.SIGTERM)
    proxy.wait_for(lambda: _refused(port), "the drain under way", timeout_s=1)
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code = proxy.proc.wait(timeout=5)
    assert code == 0 and time.monotonic() - t0 < 1.5
    late.join(5)
    assert late.results != [(200, "close")], late.results  # cut, not finished
