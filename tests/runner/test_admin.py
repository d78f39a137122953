"""The admin listener over real sockets, driven by curl: routes, keep-alive, errors."""

from __future__ import annotations

import json
import subprocess

import structlog
import trio

from proxy.runner.admin import open_admin_socket, serve_admin

LOG = structlog.get_logger("test")


class State:
    def __init__(self) -> None:
        self.ready = False
        self.stats_calls = 0

    def is_ready(self) -> bool:
        return self.ready

    async def stats_prometheus(self) -> str:
        self.stats_calls += 1
        await trio.sleep(0)
        return f"triomesh_test_total {self.stats_calls}\n"

    def config_dump(self) -> dict:
        return {"version": "3", "config": {"listeners": [{"name": "0.0.0.0_80"}]}}


async def curl(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process(["curl", "-sS", "--max-time", "5", *args], capture_stdout=True,
                                  capture_stderr=True, check=False)


async def _with_admin(test) -> None:
    state = State()
    sock = await open_admin_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, sock, state, LOG)
        await test(state, f"http://127.0.0.1:{port}")
        nursery.cancel_scope.cancel()


async def test_ready_follows_state() -> None:
    async def test(state: State, base: str) -> None:
        r = await curl("-w", "%{http_code}", base + "/ready")
        assert r.stdout == b"NOT_READY\n503"
        state.ready = True
        r = await curl("-w", "%{http_code}", base + "/ready")
        assert r.stdout == b"LIVE\n200"

    await _with_admin(test)


async def test_stats_and_config_dump_and_404() -> None:
    async def test(state: State, base: str) -> None:
        r = await curl("-i", base + "/stats/prometheus")
        head, _, body = r.stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/plain; version=0.0.4" in head.lower()
        assert body == b"triomesh_test_total 1\n"
        r = await curl(base + "/config_dump")
        assert json.loads(r.stdout) == state.config_dump()
        r = await curl("-w", "%{http_code}", base + "/nope")
        assert r.stdout.endswith(b"404")
        r = await curl("-w", "%{http_code}", "-X", "POST", base + "/ready")
        assert r.stdout.endswith(b"405")

    await _with_admin(test)


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def test(state: State, base: str) -> None:
        r = await curl("-v", base + "/stats/prometheus", base + "/stats/prometheus", base + "/ready")
        assert r.stdout == b"triomesh_test_total 1\ntriomesh_test_total 2\nNOT_READY\n"
        assert r.stderr.count(b"Connected to") == 1, r.stderr.decode()
        assert b"Re-using existing" in r.stderr or b"Reusing existing" in r.stderr

    await _with_admin(test)


async def test_malformed_request_gets_400_and_the_listener_keeps_serving() -> None:
    async def test(state: State, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /ready HTTP/1.1\r\nbad header line\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400")
        r = await curl("-w", "%{http_code}", base + "/ready")
        assert r.stdout.endswith(b"503")

    await _with_admin(test)


async def test_admin_port_is_not_shared() -> None:
    sock = await open_admin_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        try:
            other = await open_admin_socket("127.0.0.1", port)
        except OSError:
            pass
        else:
            other.close()
            raise AssertionError("a second admin socket bound the same port")
    finally:
        sock.close()
