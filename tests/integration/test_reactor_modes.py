"""The data plane under real load (h2load, HTTP/1.1 keep-alive and h2c) with its reactor held in each
mode (reactor.py, "Two modes"): always batching, always direct, and switching at every window (direct
after each WINDOW_POLLS polls, batching again at the next wait), so that every switch happens
with many connections in flight. No request may fail in any of them."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import trio

from proxy.l7.reactor import Reactor
from tests.integration.backend import Backend
from tests.integration.l7_harness import make_snapshot, prefix_route, start_proxy

MODES = {
    "batching": lambda: Reactor(probe_s=0.0, min_batch=0.0),
    "direct": lambda: Reactor(probe_s=math.inf),
    "switching": lambda: Reactor(probe_s=0.0, min_batch=math.inf),
}


async def _h2load(*args: str) -> str:
    with trio.fail_after(60):
        proc = await trio.run_process(["h2load", *args], capture_stdout=True, check=False)
    return proc.stdout.decode()


@pytest.mark.parametrize("mode", list(MODES))
async def test_keep_alive_and_h2c_load_in_each_mode(nursery, mode):
    if shutil.which("h2load") is None:
        pytest.fail("h2load (Debian nghttp2-client) is missing: make test installs it")
    backend = await Backend("b").start(nursery)
    snapshot = make_snapshot({"svc": [backend.port]}, [prefix_route(b"/", {"svc": 100})], domains=("*",))
    reactor = MODES[mode]()
    proxy = await start_proxy(nursery, snapshot, reactor=reactor)
    url = f"http://127.0.0.1:{proxy.port}/small"

    out = await _h2load("--h1", "-n", "2000", "-c", "8", url)
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", out), out
    out = await _h2load("-n", "800", "-c", "4", "-m", "8", url)
    assert re.search(r"requests: 800 total, 800 started, 800 done, 800 succeeded", out), out
    assert proxy.counter("triomesh_downstream_rq_total", response_code="200") == 2800

    if mode == "batching":
        assert reactor.batching and reactor.mode_changes == 1
    elif mode == "direct":
        assert not reactor.batching and reactor.mode_changes == 0
    else:
        assert reactor.mode_changes >= 20, reactor.mode_changes  # many switches, each way, under load
