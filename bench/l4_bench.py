"""L4 throughput: our TCP proxy's splice path and recv/send path vs a direct connection, over loopback.

    python -m bench.l4_bench [--reps 5] [--small-count 200] [--big-count 5] [--budget-s 240] [--json out.json]

A client in this process uploads 1 MiB (a fresh connection per transfer, `--small-count` of them
per repetition) and 100 MiB (`--big-count` connections) to a sink process that counts the bytes
and answers with the count (one direction carries the bulk). Targets: the sink directly, and
`python -m proxy.l4.forward` in front of it in splice mode (default: the pipe grows from 64 to
256 KiB once a connection moved 1 MiB; and with the pipe held at 64 KiB) and in copy mode
(recv_into/send, 64 KiB buffer). With 2+ cores the proxy is pinned alone on core 0, client and
sink on core 1. Reported: MB/s (10^6 bytes per wall second, client's view, connection setup
included) and the proxy process's own CPU seconds per GiB moved (on-CPU nanoseconds of its threads
from /proc/<pid>/task/*/schedstat; /proc/<pid>/stat's 10 ms ticks are too coarse for short runs).
Targets are interleaved per repetition and medians reported, because the machine is shared and
noisy; the whole run stops early (with what it has) when `--budget-s` is spent.
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
        raise RuntimeError(f"{argv} exited before it was ready")
    return proc, first


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[str] | None = None  # the proxy; None for the direct connection
    results: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)  # size -> [(MB/s, cpu s/GiB)]


def _start_proxy(name: str, sink_port: int, cpus: str | None, *extra: str) -> Target:
    argv = [
        *_pin(cpus),
        sys.executable,
        "-m",
        "proxy.l4.forward",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--quiet",
        *extra,
    ]
    proc, first = _start(argv)
    return Target(name, json.loads(first)["port"], proc)


# --- the client -----------------------------------------------------------------------------------


def _upload(port: int, size: int) -> None:
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


def _proxy_cpu_s(pid: int) -> float:
    """CPU seconds (user+system) of all threads of `pid`, in nanosecond resolution when the kernel
    exposes schedstat, else from /proc/<pid>/stat ticks."""
    try:
        total_ns = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        return total_ns / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        return cpu_seconds([pid])


def _measure(target: Target, size: int, count: int) -> tuple[float, float | None]:
    pids = [target.proc.pid] if target.proc else []
    cpu_before = _proxy_cpu_s(pids[0]) if pids else 0.0
    started = time.perf_counter()
    for _ in range(count):
        _upload(target.port, size)
    wall = time.perf_counter() - started
    moved = size * count
    mbps = moved / wall / 1e6
    if not pids:
        return mbps, None
    # the proxy may still be closing the last connection: give its CPU time a moment to settle
    time.sleep(0.05)
    cpu = _proxy_cpu_s(pids[0]) - cpu_before
    return mbps, cpu / (moved / GiB)


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
    sink, first = _start([*_pin(load_cpus), sys.executable, "-m", "bench.l4_bench", "sink"])
    sink_port = int(first)
    targets = [Target("direct", sink_port)]
    try:
        targets.append(_start_proxy("splice", sink_port, proxy_cpus, "--mode", "splice"))
        targets.append(
            _start_proxy("splice-64KiB-pipe", sink_port, proxy_cpus, "--mode", "splice", "--bulk-pipe-bytes", str(64 * 1024))
        )
        targets.append(_start_proxy("copy", sink_port, proxy_cpus, "--mode", "copy"))
        for t in targets:  # warm up: imports, first connection, page faults
            _upload(t.port, MiB)
        deadline = time.monotonic() + args.budget_s
        for rep in range(args.reps):
            for size_name, size in SIZES.items():
                count = args.small_count if size == MiB else args.big_count
                for t in targets:
                    t.results.setdefault(size_name, []).append(_measure(t, size, count))
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
