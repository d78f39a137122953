"""How long slow clients hold a worker's scheduler: the CPU time of each Trio scheduler batch while
thousands of slowloris connections send bursts and then time out together.

    python -m bench.scheduler_stalls [--source DIR] [--slow 1000] [--bursts 10] [--reps 3]

A request that becomes ready during a batch waits for the rest of it, so the longest batches are
what slow clients add to other clients' latency. Wall-clock latency on a shared machine mostly
measures the machine; a batch's CPU time (`time.thread_time()`, measured by a Trio instrument from
the end of one I/O wait to the start of the next) does not move with other processes' load.

The proxy runs in-process as one worker (DataPlane + serve_listener on `make bench`'s Istio
resources, like bench.instructions; `--source DIR` measures another checkout) with a 5 s request
header timeout. No other client runs. Two phases:
1. bursts: --slow connections send a request line, then --bursts bursts of one header byte each
   (0.25 s apart, all connections in one burst, never the end of the head);
2. timeout: the header timeout fires for all of them together; each is answered (408) and closed,
   and the client opens a new one at once, as slowloris does.
Reported per phase, medians over --reps runs: the longest batch, the 99.9th percentile and the sum of
batches longer than 1 ms (milliseconds of CPU); and the garbage collector's passes in the timeout
phase (gc.callbacks: passes of generations 0/1/2, the longest and their sum, CPU ms), which land
inside batches.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import free_port, start_nginx, triomesh_config

HEADER_TIMEOUT_S = 5.0
BURST_INTERVAL_S = 0.25

_PROXY = r'''
import gc, json, os, signal, sys, time
sys.path.insert(0, os.environ["TM_SOURCE"])
import trio

config, port_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]


class BatchClock(trio.abc.Instrument):
    """CPU time of each scheduler batch: from the end of an I/O wait to the start of the next."""

    def __init__(self):
        self.started = None
        self.phase = "start"
        self.batches = {}

    def after_io_wait(self, timeout):
        self.started = time.thread_time()

    def before_io_wait(self, timeout):
        if self.started is not None:
            self.batches.setdefault(self.phase, []).append(time.thread_time() - self.started)


class GcClock:
    """Each garbage collection's generation and CPU time (gc.callbacks), per phase."""

    def __init__(self, batch_clock):
        self.batch_clock = batch_clock
        self.started = 0.0
        self.passes = {}

    def __call__(self, stage, info):
        if stage == "start":
            self.started = time.thread_time()
        else:
            self.passes.setdefault(self.batch_clock.phase, []).append(
                (info["generation"], time.thread_time() - self.started))


async def main():
    from proxy import logging as proxy_logging
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes
    from proxy.l7.dataplane import DataPlane, HttpSettings
    from proxy.l7.server import serve_listener
    from proxy.runtime import SnapshotHolder
    from proxy.stats import Stats
    proxy_logging.configure(level="error")  # as `triomesh proxy --log-level error`
    try:  # what a worker does at start-up, in a checkout that has it
        from proxy.runner.worker import freeze_startup_objects
    except ImportError:
        pass
    else:
        freeze_startup_objects()
    with open(config, "rb") as f:
        snapshot = compile_resources(load_bytes(f.read(), "bench.yaml"), version="1", bind_address="127.0.0.1")
    listener = snapshot.listeners[0]
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", listener.port))
    sock.listen(4096)
    settings = HttpSettings(request_headers_timeout_s=float(os.environ["TM_HEADER_TIMEOUT_S"]))
    clock = BatchClock()
    trio.lowlevel.add_instrument(clock)
    gc_clock = GcClock(clock)
    gc.callbacks.append(gc_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listener, sock, listener.name, DataPlane(SnapshotHolder(snapshot), Stats(), None, settings))
        with open(port_file, "w") as f:
            f.write(str(listener.port))
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
            async for signum in signals:  # SIGUSR1: the next phase begins
                if signum == signal.SIGTERM:
                    break
                clock.phase = {"start": "bursts", "bursts": "timeout"}.get(clock.phase, "end")
        nursery.cancel_scope.cancel()
    with open(out_file, "w") as f:
        json.dump({"batches": clock.batches, "gc": gc_clock.passes}, f)

trio.run(main)
'''

_REQUEST_LINE = b"GET /small HTTP/1.1\r\nhost: bench\r\n"


def _open(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(_REQUEST_LINE)
        s.setblocking(False)
        socks.append(s)
    return socks


def one_run(source: Path, backend_port: int, workdir: Path, args) -> dict:
    script = workdir / "proxy_with_batch_clock.py"
    script.write_text(_PROXY)
    port_file, out_file = workdir / "port", workdir / "batches.json"
    port_file.unlink(missing_ok=True)
    config = workdir / "bench.yaml"
    config.write_text(triomesh_config(free_port(), backend_port))
    proc = subprocess.Popen([sys.executable, str(script), str(config), str(port_file), str(out_file)],
                            env=dict(os.environ, TM_SOURCE=str(source), TM_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S)),
                            stderr=subprocess.PIPE)
    socks: list[socket.socket] = []
    answered_408 = 0
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not start: {proc.communicate()[1].decode()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text())
        socks = _open(port, args.slow)
        time.sleep(0.5)
        opened = time.monotonic()
        proc.send_signal(signal.SIGUSR1)  # phase: bursts
        for burst in range(args.bursts):
            for s in socks:
                s.send(b"x-slow: a"[burst % 9:burst % 9 + 1])
            time.sleep(BURST_INTERVAL_S)
        if time.monotonic() - opened > HEADER_TIMEOUT_S - 1.5:
            raise RuntimeError("the bursts reached the header timeout: fewer --bursts")
        proc.send_signal(signal.SIGUSR1)  # phase: timeout (and the reconnections)
        selector = selectors.DefaultSelector()
        for s in socks:
            selector.register(s, selectors.EVENT_READ)
        fresh = []
        until = opened + HEADER_TIMEOUT_S + 5
        while len(fresh) < args.slow and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.1):
                s = key.fileobj
                try:
                    answered_408 += s.recv(4096).startswith(b"HTTP/1.1 408")
                except OSError:
                    pass
                selector.unregister(s)
                s.close()
                fresh.extend(_open(port, 1))
        selector.close()
        socks = fresh
        time.sleep(1.0)  # the new connections' request lines read
        proc.send_signal(signal.SIGUSR1)  # phase: end (the shutdown's cancellation of every task is not measured)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
    measured = json.loads(out_file.read_text())
    batches = measured["batches"]
    row = {"source": str(source), "answered_408": answered_408, "loadavg": os.getloadavg()[0]}
    for phase in ("bursts", "timeout"):
        ms = sorted(b * 1e3 for b in batches.get(phase, []))
        row[phase] = {"batches": len(ms), "max_ms": ms[-1], "p999_ms": ms[int(len(ms) * 0.999)],
                      "over_1ms_sum_ms": sum(b for b in ms if b > 1.0), "cpu_ms": sum(ms)}
        passes = measured["gc"].get(phase, [])
        row[phase]["gc"] = {"passes_by_generation": [sum(1 for g, _ in passes if g == n) for n in range(3)],
                            "max_ms": max((d * 1e3 for _, d in passes), default=0.0),
                            "sum_ms": sum(d for _, d in passes) * 1e3}
    return row


def med_gc(key: str, rows: list[dict]) -> float:
    return statistics.median(r["timeout"]["gc"][key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scheduler_stalls", description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, action="append",
                    help="checkout whose proxy/ is measured (repeat to alternate several; default: this one)")
    ap.add_argument("--slow", type=int, default=1000, help="slow connections (default 1000: one worker's share of 2,000)")
    ap.add_argument("--bursts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sources = args.source or [Path(__file__).resolve().parent.parent]
    rows = []
    with tempfile.TemporaryDirectory(prefix="triomesh-stalls-") as tmp:
        workdir = Path(tmp)
        backend = start_nginx(workdir / "nginx", cpus=None)
        try:
            for _ in range(args.reps):
                for source in sources:
                    row = one_run(source, backend.port, workdir, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            backend.stop()
    print()
    print(f"{args.slow} slow connections on one worker, {args.bursts} byte bursts, then their header timeout "
          f"and reconnection; medians of {args.reps} runs, scheduler batch CPU in ms")
    print("| source | bursts: max / p99.9 / >1 ms sum / total | timeout: max / p99.9 / >1 ms sum / total "
          "| timeout GC: passes gen 0/1/2, max / sum | 408s |")
    print("|---|---|---|---|---|")
    for source in sources:
        mine = [r for r in rows if r["source"] == str(source)]

        def med(phase: str, key: str, mine: list[dict] = mine) -> float:
            return statistics.median(r[phase][key] for r in mine)
        cells = [" / ".join(f"{med(p, k):.2f}" for k in ("max_ms", "p999_ms", "over_1ms_sum_ms", "cpu_ms"))
                 for p in ("bursts", "timeout")]
        passes = "/".join(f"{statistics.median(r['timeout']['gc']['passes_by_generation'][n] for r in mine):.0f}"
                          for n in range(3))
        gc_cell = f"{passes}, {med_gc('max_ms', mine):.2f} / {med_gc('sum_ms', mine):.2f}"
        print(f"| {source} | {cells[0]} | {cells[1]} | {gc_cell} | "
              f"{statistics.median(r['answered_408'] for r in mine):.0f} |")


if __name__ == "__main__":
    main()
