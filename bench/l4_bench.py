"""L4 throughput: our TCP proxy's splice path and recv/send path vs a direct connection, over loopback.

    python -m bench.l4_bench [--reps 5] [--small-count 200] [--big-count 5] [--budget-s 240] [--json out.json]

A client in this process uploads 1 MiB (a fresh connection per transfer, `--small-count` of them
per repetition) and 100 MiB (`--big-count` connections) to a sink process that counts the bytes
and answers with the count (one direction carries the bulk). Targets: the sink directly, and
`python -m proxy.l4.forward` in front of it in splice mode (default: the pipe grows from 64 to
256 KiB once a connection moved 1 MiB; and with the pipe held at 64 KiB) and in copy mode
(recv_into/send, 64 KiB buffer). With 2+ cores the proxy is pinned alone on core 0, client and
sink on core 1. Reported: MB/s (10^6 bytes per wall second, client's view, connection setup
included) and the proxy process's own CPU seconds per GiB moved (bench.measure.cpu_seconds: on-CPU
nanoseconds of its threads). Targets are interleaved per repetition and medians reported, because the
machine is shared and noisy; the whole run stops early (with what it has) when `--budget-s` is spent.

The sink, the forwarder launcher and the transfer client are also used by `python -m bench` for its
TCP rows (triomesh vs Envoy's tcp_proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
SIZES = {"1MiB": 1 * MiB, "100MiB": 100 * MiB}
_CHUNK = memoryview(os.urandom(MiB))
# no single transfer may hang the run: a stuck proxy fails the bench instead
_IO_TIMEOUT_S = 60.0


# --- the sink (run as `python -m bench.l4_bench sink`) --------------------------------------------


def run_sink() -> int:
    """Accept connections one by one; read to EOF; reply with the byte count (8 bytes, big endian)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)
    buf = bytearray(MiB)
    while True:
        conn, _ = listener.accept()
        with conn:
            total = 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(total.to_bytes(8, "big"))


# --- processes ------------------------------------------------------------------------------------


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{argv} exited before it was ready")
    return proc, first


def start_sink(cpus: str | None) -> tuple[subprocess.Popen[str], int]:
    """The counting sink as its own process; returns it and its port."""
    proc, first = _start([*_pin(cpus), sys.executable, "-m", "bench.l4_bench", "sink"])
    return proc, int(first)


def start_forwarder(upstream_port: int, cpus: str | None, mode: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """`python -m proxy.l4.forward` in front of 127.0.0.1:upstream_port; returns it and its port."""
    argv = [*_pin(cpus), sys.executable, "-m", "proxy.l4.forward", "--listen", "127.0.0.1:0",
            "--upstream", f"127.0.0.1:{upstream_port}", "--quiet", "--mode", mode, *extra]
    proc, first = _start(argv)
    return proc, json.loads(first)["port"]


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[str] | None = None  # the proxy; None for the direct connection
    results: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)  # size -> [(MB/s, cpu s/GiB)]


# --- the client -----------------------------------------------------------------------------------


def upload(port: int, size: int) -> None:
    """One connection: send `size` bytes, half-close, check the sink's count."""
    with socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT_S) as sock:
        left = size
        while left:
            n = min(left, len(_CHUNK))
            sock.sendall(_CHUNK[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            chunk = sock.recv(8 - len(reply))
            if not chunk:
                break
            reply += chunk
    if int.from_bytes(reply, "big") != size:
        raise RuntimeError(f"sink counted {int.from_bytes(reply, 'big')} bytes, sent {size}")


@dataclass
class Transfer:
    bytes: int
    wall_s: float
    cpu_s: float | None  # of the proxy's processes; None for a direct connection

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.wall_s / 1e6

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.wall_s / MiB

    @property
    def cpu_s_per_gib(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / (self.bytes / GiB)


def measure_transfers(port: int, size: int, count: int, proxy_pids: list[int]) -> Transfer:
    """`count` sequential uploads of `size` bytes through `port`, with the CPU the proxy spent on them."""
    cpu_before = cpu_seconds(proxy_pids) if proxy_pids else 0.0
    started = time.perf_counter()
    for _ in range(count):
        upload(port, size)
    wall = time.perf_counter() - started
    if not proxy_pids:
        return Transfer(size * count, wall, None)
    # the proxy may still be closing the last connection: give its CPU time a moment to settle
    time.sleep(0.05)
    return Transfer(size * count, wall, cpu_seconds(proxy_pids) - cpu_before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.l4_bench", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "sink"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--small-count", type=int, default=200, help="1 MiB transfers per repetition")
    parser.add_argument("--big-count", type=int, default=5, help="100 MiB transfers per repetition")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop after this long")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.command == "sink":
        return run_sink()

    two_cores = (os.cpu_count() or 1) >= 2
    proxy_cpus, load_cpus = ("0", "1") if two_cores else (None, None)
    if load_cpus:
        os.sched_setaffinity(0, {int(load_cpus)})
    sink, sink_port = start_sink(load_cpus)
    targets = [Target("direct", sink_port)]
    try:
        for name, mode, extra in [("splice", "splice", ()),
                                  ("splice-64KiB-pipe", "splice", ("--bulk-pipe-bytes", str(64 * 1024))),
                                  ("copy", "copy", ())]:
            proc, port = start_forwarder(sink_port, proxy_cpus, mode, *extra)
            targets.append(Target(name, port, proc))
        for t in targets:  # warm up: imports, first connection, page faults
            upload(t.port, MiB)
        deadline = time.monotonic() + args.budget_s
        for rep in range(args.reps):
            for size_name, size in SIZES.items():
                count = args.small_count if size == MiB else args.big_count
                for t in targets:
                    m = measure_transfers(t.port, size, count, [t.proc.pid] if t.proc else [])
                    t.results.setdefault(size_name, []).append((m.mb_per_s, m.cpu_s_per_gib))
            if time.monotonic() > deadline:
                print(f"budget spent after {rep + 1} repetitions", file=sys.stderr)
                break
    finally:
        for t in targets:
            if t.proc:
                t.proc.kill()
                t.proc.wait()
        sink.kill()
        sink.wait()

    rows = []
    for size_name in SIZES:
        direct = statistics.median(m for m, _ in targets[0].results[size_name])
        for t in targets:
            samples = t.results[size_name]
            mbps = statistics.median(m for m, _ in samples)
            cpus = [c for _, c in samples if c is not None]
            rows.append(
                {
                    "size": size_name,
                    "target": t.name,
                    "mb_per_s": round(mbps, 1),
                    "vs_direct": round(mbps / direct, 2),
                    "proxy_cpu_s_per_gib": round(statistics.median(cpus), 3) if cpus else None,
                    "reps": len(samples),
                }
            )
    print(f"{'size':<8} {'target':<20} {'MB/s':>9} {'vs direct':>9} {'proxy CPU s/GiB':>16}")
    for r in rows:
        cpu = "-" if r["proxy_cpu_s_per_gib"] is None else f"{r['proxy_cpu_s_per_gib']:.3f}"
        print(f"{r['size']:<8} {r['target']:<20} {r['mb_per_s']:>9.1f} {r['vs_direct']:>9.2f} {cpu:>16}")
    print(f"(proxy pinned to CPU {proxy_cpus}, client+sink to CPU {load_cpus}; medians of {rows[0]['reps']} repetitions)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "proxy_cpus": proxy_cpus, "load_cpus": load_cpus}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
