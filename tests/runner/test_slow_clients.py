"""Slow clients cost their own time only: a real proxy with a short request header timeout, a few
hundred slowloris connections, and keep-alive clients served meanwhile. (How much the others' latency
moves is measured by bench/slowloris.py, not here.)"""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from tests.runner.harness import Backend, Proxy, free_port, keepalive_load, mesh_config

SLOW_CONNECTIONS = 300
HEADER_TIMEOUT_S = 2


@pytest.fixture
def backends():
    v1, v2 = Backend("v1"), Backend("v2")
    yield v1, v2
    v1.close()
    v2.close()


def _slow_clients(port: int, count: int, max_s: float, opened: threading.Event) -> list[bytes]:
    """`count` connections that send a request line and then one header byte every 0.2 s, never the
    end of the head; what each received before the proxy closed it (b"" for a close without an
    answer). Bounded by `max_s`."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /slow HTTP/1.1\r\nhost: backend\r\nx-slow: ")
        s.setblocking(False)
        socks.append(s)
    opened.set()
    received = {s: b"" for s in socks}
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    open_socks = set(socks)
    deadline = time.monotonic() + max_s
    next_byte = time.monotonic()
    while open_socks and time.monotonic() < deadline:
        if time.monotonic() >= next_byte:
            next_byte += 0.2
            for s in list(open_socks):
                try:
                    s.send(b"a")
                except OSError:
                    pass  # closed by the proxy: the selector reports it
        for key, _ in selector.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                received[s] += data
            else:
                open_socks.discard(s)
                selector.unregister(s)
    selector.close()
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} slow connections still open after {max_s} s"
    return [received[s] for s in socks]


def test_slow_connections_get_408_at_the_header_timeout_while_others_are_served(tmp_path, backends):
    port = free_port()
    config = tmp_path / "mesh.yaml"
    config.write_text(mesh_config(port, backends[0].port, backends[1].port))
    proxy = Proxy(config, tmp_path, concurrency=2,
                  extra_args=["--request-headers-timeout", f"{HEADER_TIMEOUT_S}s"]).start()
    try:
        opened = threading.Event()
        answers: list[bytes] = []
        slow = threading.Thread(target=lambda: answers.extend(
            _slow_clients(port, SLOW_CONNECTIONS, HEADER_TIMEOUT_S + 20, opened)))
        slow.start()
        assert opened.wait(30), "the slow connections did not open"
        # keep-alive clients while every slow connection is open and until their timeouts have fired
        load = keepalive_load(port, "/fast", connections=8, total=100_000, max_s=HEADER_TIMEOUT_S + 1)
        slow.join(HEADER_TIMEOUT_S + 40)
        assert not slow.is_alive()

        assert len(answers) == SLOW_CONNECTIONS
        not_408 = [a[:40] for a in answers if not a.startswith(b"HTTP/1.1 408 Request Timeout")]
        assert not not_408, f"{len(not_408)} slow connections ended without a 408, e.g. {not_408[:3]}"
        assert all(b"connection: close" in a.lower() for a in answers)
        assert load.failures == [], load.failures[:5]
        assert load.ok > 0, "no other client was served while the slow ones were open"

        timeouts = proxy.stats("triomesh_downstream_rq_header_timeout_total")
        assert sum(timeouts.values()) == SLOW_CONNECTIONS
        by_code = proxy.stats("triomesh_downstream_rq_total")
        assert sum(v for labels, v in by_code.items() if ("response_code", "408") in labels) == SLOW_CONNECTIONS

        def access_lines_408():  # the access log is flushed every second
            lines = [r for r in proxy.log_records() if "response_flags" in r and r.get("status") == 408]
            return lines if len(lines) >= SLOW_CONNECTIONS else None

        assert len(proxy.wait_for(access_lines_408, "an access log line for every 408")) == SLOW_CONNECTIONS

        def access_lines_served():
            lines = [r for r in proxy.log_records() if "response_flags" in r and r.get("path") == "/fast"]
            return lines if len(lines) >= load.ok else None

        served = proxy.wait_for(access_lines_served, "an access log line for every request of the others")
        assert len(served) == load.ok and all(r["status"] == 200 for r in served)
    finally:
        proxy.stop()
