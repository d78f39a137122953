"""Slow clients side by side: other clients' latency with and without thousands of slowloris connections.

    python -m bench.slowloris [--reps 3] [--slow 2000] [--envoy PATH] [--source DIR ...]
    python -m bench.slowloris --cpu-per-byte [--reps 5] [--slow 2000]

Per repetition, triomesh and Envoy alternate, each with 2 workers in front of the same nginx backend
and the same request header timeout (--header-timeout, 10 s: triomesh's --request-headers-timeout,
Envoy's request_headers_timeout). For each target:

1. quiet: h2load sends a fixed rate (--rps over 32 keep-alive HTTP/1.1 connections, staggered) for
   --duration seconds; its per-request log gives p50, p99 and max;
2. slowloris: --slow connections each send a request line and then one header byte every 5 s, all
   of them in one burst as the classic tool does; a connection the proxy closes (408 at the header
   timeout) is opened again. Once all are open, the same h2load run again, meanwhile.

`--cpu-per-byte` measures instead what one slow byte costs the proxy, a figure the machine's load
moves far less than latency: --slow connections send their request line, then --bursts bursts of one
byte each (0.2 s apart, never the end of the head); the proxy's CPU time (all processes, user and
kernel, from schedstat) over the bursts, minus its CPU over an equally long quiet interval, divided
by the bytes sent.

`--source DIR` (repeatable) runs triomesh from another checkout (its proxy/ first on PYTHONPATH),
one target per checkout, alternating with the others: a change and its parent side by side.

Reported per run and as medians over the runs: quiet and slowloris p50/p99/max, the p99 ratio, the
408s the slow connections received, and h2load's failed requests. Bounded: each phase lasts
--duration seconds, the slow connections are --slow at most. Not part of `make test` (it needs nginx,
h2load and Envoy; bench/__main__.py installs them); about 30 s per target and repetition.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import load
from bench.__main__ import ensure_tools
from bench.targets import (
    _ENVOY_HTTP_FILTER,
    Started,
    _envoy_config,
    free_port,
    start_nginx,
    triomesh_config,
    wait_http_ok,
)

CONNECTIONS = 32
SLOW_BYTE_INTERVAL_S = 5.0
# what a slow client sends: a request line and a header, one byte per interval, never the end of the head
_SLOW_REQUEST_LINE = b"GET /small HTTP/1.1\r\nhost: bench\r\n"
_SLOW_HEADER = b"x-slow: " + b"a" * 4096


@dataclass
class Slowloris:
    """`count` slow connections to 127.0.0.1:port, run by one thread with a selector. Each opens,
    sends the request line, then one header byte per interval (all connections in one burst); when
    the proxy answers or closes, it is counted and replaced by a fresh one."""

    port: int
    count: int
    stop: threading.Event = field(default_factory=threading.Event)
    open_now: int = 0
    answered_408: int = 0
    closed_otherwise: int = 0
    connect_failures: int = 0

    def run(self, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        selector = selectors.DefaultSelector()
        sent: dict[socket.socket, int] = {}

        def open_one() -> None:
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                s.sendall(_SLOW_REQUEST_LINE)
                s.setblocking(False)
            except OSError:
                self.connect_failures += 1
                return
            sent[s] = 0
            selector.register(s, selectors.EVENT_READ)

        def close(s: socket.socket) -> None:
            selector.unregister(s)
            del sent[s]
            s.close()

        for _ in range(self.count):
            if self.stop.is_set():
                break
            open_one()
        next_burst = time.monotonic() + SLOW_BYTE_INTERVAL_S
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                self.open_now = len(sent)
                for key, _ in selector.select(timeout=0.1):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if data.startswith(b"HTTP/1.1 408"):
                        self.answered_408 += 1
                    else:
                        self.closed_otherwise += 1
                    close(s)
                while len(sent) < self.count and not self.stop.is_set():
                    open_one()
                if time.monotonic() >= next_burst:
                    next_burst += SLOW_BYTE_INTERVAL_S
                    for s, n in list(sent.items()):
                        try:
                            s.send(_SLOW_HEADER[n % len(_SLOW_HEADER):][:1])
                            sent[s] = n + 1
                        except OSError:
                            pass  # closed by the proxy: the selector reports it
        finally:
            for s in list(sent):
                close(s)
            selector.close()


def _envoy_filter(header_timeout_s: float) -> dict:
    network_filter = copy.deepcopy(_ENVOY_HTTP_FILTER)
    network_filter["typed_config"]["request_headers_timeout"] = f"{header_timeout_s:g}s"
    return network_filter


def start_target(target: str, workdir: Path, backend_port: int, envoy_bin: str, header_timeout_s: float) -> Started:
    """triomesh or Envoy with 2 workers, unpinned (the slow connections spread over both)."""
    import subprocess

    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    if target == "envoy":
        conf = workdir / "envoy.yaml"
        conf.write_text(_envoy_config(_envoy_filter(header_timeout_s), port=port, admin_port=admin_port,
                                      backend_port=backend_port))
        cmd = [envoy_bin, "-c", str(conf), "--concurrency", "2", "--log-level", "error", "--disable-hot-restart"]
        log = workdir / "envoy.log"
    else:
        target, _, source = target.partition(":")
        config_dir = workdir / "config"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "bench.yaml").write_text(triomesh_config(port, backend_port))
        triomesh = str(Path(sys.executable).with_name("triomesh"))
        cmd = [triomesh, "proxy", "--config", str(config_dir), "--concurrency", "2", "--access-log", "off",
               "--bind-address", "127.0.0.1", "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "error",
               "--request-headers-timeout", f"{header_timeout_s:g}s"]
        log = workdir / "triomesh.log"
    env = dict(os.environ, PYTHONPATH=source) if target == "triomesh" and source else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
    started = Started(target, proc, port, workdir)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/small")
    except Exception as e:
        detail = started.log_tail()
        started.stop()
        raise RuntimeError(f"{target} did not start: {e}\n{detail}") from e
    return started


def _phase(port: int, rps: int, duration_s: float) -> load.LoadResult:
    return load.run_fixed_rate_h2load(f"http://127.0.0.1:{port}/small", total_rps=rps, duration_s=duration_s,
                                      clients=CONNECTIONS).result


def one_run(target: str, workdir: Path, backend_port: int, envoy_bin: str, args) -> dict:
    proxy = start_target(target, workdir, backend_port, envoy_bin, args.header_timeout)
    try:
        quiet = _phase(proxy.port, args.rps, args.duration)
        slow = Slowloris(proxy.port, args.slow)
        thread = threading.Thread(target=slow.run, args=(args.duration + 60,))
        thread.start()
        try:
            opened_by = time.monotonic() + 30
            while slow.open_now < args.slow * 0.95 and time.monotonic() < opened_by:
                time.sleep(0.1)
            loaded = _phase(proxy.port, args.rps, args.duration)
        finally:
            slow.stop.set()
            thread.join(30)
    finally:
        proxy.stop()
    return {
        "target": target,
        "quiet": {"p50_ms": quiet.p50_ms, "p99_ms": quiet.p99_ms, "max_ms": quiet.max_ms, "failed": quiet.errors},
        "slowloris": {"p50_ms": loaded.p50_ms, "p99_ms": loaded.p99_ms, "max_ms": loaded.max_ms,
                      "failed": loaded.errors},
        "p99_ratio": loaded.p99_ms / quiet.p99_ms if quiet.p99_ms else float("nan"),
        "slow_open": slow.open_now,
        "slow_408": slow.answered_408,
        "slow_closed_otherwise": slow.closed_otherwise,
        "slow_connect_failures": slow.connect_failures,
        "loadavg": os.getloadavg()[0],
    }


BURST_INTERVAL_S = 0.2


def cpu_per_slow_byte(target: str, workdir: Path, backend_port: int, envoy_bin: str, args) -> dict:
    """The proxy's CPU µs per slow byte (see the module docstring), one run."""
    proxy = start_target(target, workdir, backend_port, envoy_bin, args.header_timeout)
    socks: list[socket.socket] = []
    try:
        for _ in range(args.slow):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(_SLOW_REQUEST_LINE)
            socks.append(s)
        time.sleep(1.0)  # every connection accepted and its request line read
        quiet_s = args.bursts * BURST_INTERVAL_S
        cpu0 = proxy.cpu_seconds()
        time.sleep(quiet_s)
        idle_cpu_s = proxy.cpu_seconds() - cpu0
        cpu0 = proxy.cpu_seconds()
        started = time.monotonic()
        for burst in range(args.bursts):
            for s in socks:
                s.send(_SLOW_HEADER[burst:burst + 1])
            time.sleep(max(0.0, started + (burst + 1) * BURST_INTERVAL_S - time.monotonic()))
        burst_cpu_s = proxy.cpu_seconds() - cpu0
        elapsed_s = time.monotonic() - started
        if elapsed_s > args.header_timeout - 1:
            raise RuntimeError(f"the bursts took {elapsed_s:.1f} s, close to the header timeout: fewer --bursts")
        answered = 0
        for s in socks:
            s.setblocking(False)
            try:
                answered += bool(s.recv(1))
            except BlockingIOError:
                pass
            except OSError:
                answered += 1
        if answered:
            raise RuntimeError(f"{answered} slow connections were answered or closed during the bursts")
    finally:
        for s in socks:
            s.close()
        proxy.stop()
    slow_bytes = args.slow * args.bursts
    return {"target": target, "cpu_us_per_slow_byte": (burst_cpu_s - idle_cpu_s * elapsed_s / quiet_s) / slow_bytes * 1e6,
            "burst_cpu_s": burst_cpu_s, "idle_cpu_s": idle_cpu_s, "slow_bytes": slow_bytes,
            "loadavg": os.getloadavg()[0]}


def _targets(args) -> list[str]:
    """--targets, with triomesh once per --source ("triomesh:DIR")."""
    targets = []
    for target in args.targets.split(","):
        if target == "triomesh" and args.source:
            targets += [f"triomesh:{source}" for source in args.source]
        else:
            targets.append(target)
    return targets


def _alternating_runs(args, envoy_bin: str, measure, prefix: str) -> list[dict]:
    """`measure(target, workdir, backend_port, envoy_bin, args)` for each repetition and target in
    turn, in front of one nginx backend; each row printed as it comes."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="slowloris-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = start_nginx(tmpdir / "nginx", cpus=None)
        try:
            for rep in range(args.reps):
                for number, target in enumerate(_targets(args)):
                    row = measure(target, tmpdir / f"{number}-{prefix}{rep}", backend.port, envoy_bin, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            backend.stop()
    return rows


def main_cpu_per_byte(args, envoy_bin: str) -> None:
    rows = _alternating_runs(args, envoy_bin, cpu_per_slow_byte, "cpu-")
    print()
    print(f"{args.slow} slow connections, {args.bursts} bursts of one byte each; medians of {args.reps} runs")
    print("| target | proxy CPU µs per slow byte | runs | load average |")
    print("|---|---|---|---|")
    for target in _targets(args):
        mine = [r for r in rows if r["target"] == target]
        runs = ", ".join(f"{r['cpu_us_per_slow_byte']:.1f}" for r in mine)
        loads = [r["loadavg"] for r in mine]
        print(f"| {target} | {statistics.median(r['cpu_us_per_slow_byte'] for r in mine):.1f} | {runs} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slow", type=int, default=2000, help="slow connections (default 2000)")
    ap.add_argument("--rps", type=int, default=2000, help="the other clients' total request rate (default 2000)")
    ap.add_argument("--duration", type=float, default=12.0,
                    help="seconds of each phase (default 12: the slowloris phase sees a header timeout burst)")
    ap.add_argument("--header-timeout", type=float, default=10.0, help="request header timeout, seconds")
    ap.add_argument("--targets", default="triomesh,envoy")
    ap.add_argument("--source", action="append", default=[],
                    help="checkout whose proxy/ triomesh runs (repeat to alternate several; default: as this process imports it)")
    ap.add_argument("--envoy", default=None, help="Envoy binary (default: bench/.venv-bench, installed if missing)")
    ap.add_argument("--cpu-per-byte", action="store_true", help="measure the proxy's CPU per slow byte instead")
    ap.add_argument("--bursts", type=int, default=20, help="with --cpu-per-byte: bursts of one byte per connection")
    args = ap.parse_args()
    envoy_bin = args.envoy or ensure_tools(profile=False)
    if args.cpu_per_byte:
        main_cpu_per_byte(args, envoy_bin)
        return
    rows = _alternating_runs(args, envoy_bin, one_run, "")
    print()
    print(f"{args.slow} slow connections, {args.rps} req/s over {CONNECTIONS} keep-alive connections, "
          f"{args.duration:g} s per phase, header timeout {args.header_timeout:g} s; medians of {args.reps} runs")
    print("| target | quiet p50 / p99 / max ms | slowloris p50 / p99 / max ms | p99 ratio | failed | 408s |")
    print("|---|---|---|---|---|---|")
    for target in _targets(args):
        mine = [r for r in rows if r["target"] == target]

        def med(phase: str, key: str, mine: list[dict] = mine) -> float:
            return statistics.median(r[phase][key] for r in mine)
        print(f"| {target} | {med('quiet', 'p50_ms'):.2f} / {med('quiet', 'p99_ms'):.2f} / {med('quiet', 'max_ms'):.1f} | "
              f"{med('slowloris', 'p50_ms'):.2f} / {med('slowloris', 'p99_ms'):.2f} / {med('slowloris', 'max_ms'):.1f} | "
              f"{statistics.median(r['p99_ratio'] for r in mine):.2f} | "
              f"{sum(r['quiet']['failed'] + r['slowloris']['failed'] for r in mine)} | "
              f"{statistics.median(r['slow_408'] for r in mine):.0f} |")


if __name__ == "__main__":
    main()
