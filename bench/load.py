"""Load generators driven as a user would: wrk for closed-loop HTTP/1.1 load, h2load for closed-loop HTTP/2
load and for fixed request rates (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass

# wrk's done() hook prints one JSON line we can parse exactly (no scraping of the human table).
_WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_timeout": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    bytes: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float = 0.0  # from h2load's per-request log (wrk's summary: not read)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration_s / (1 << 20) if self.duration_s else 0.0


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def run_wrk(url: str, *, connections: int, duration_s: int, threads: int = 1, cpus: str | None = None,
            host_header: str | None = None, timeout_s: int = 5, close: bool = False) -> LoadResult:
    """`close`: each request asks `Connection: close`, so every request is a new connection (wrk
    reconnects after each response)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_REPORT_LUA)
        script = f.name
    try:
        cmd = _pin(cpus) + ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s",
                            f"--timeout={timeout_s}s", "-s", script]
        if host_header:
            cmd += ["-H", f"Host: {host_header}"]
        if close:
            cmd += ["-H", "Connection: close"]
        cmd.append(url)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    finally:
        os.unlink(script)
    line = next(ln for ln in out.splitlines() if ln.startswith("{"))
    r = json.loads(line)
    errors = r["non2xx"] + r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return LoadResult(r["requests"], r["duration_us"] / 1e6, r["bytes"], errors,
                      r["p50_us"] / 1000, r["p90_us"] / 1000, r["p99_us"] / 1000)


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# h2load's summary: "finished in 5.00s, 15000.00 req/s, ..." and "requests: N total, N started, N done,
# N succeeded, N failed, N errored, N timeout" (failed includes errored, errored includes timeout).
_H2LOAD_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s),", re.MULTILINE)
_H2LOAD_REQUESTS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                              r"(\d+) failed, (\d+) errored, (\d+) timeout", re.MULTILINE)
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass
class H2loadRun:
    """One h2load run: the parsed result, and its own output for when something went wrong."""
    result: LoadResult
    output: str
    command: list[str]


def _run_h2load(args: list[str], url: str, *, timeout_s: float, duration_mode: bool,
                cpus: str | None) -> H2loadRun:
    """h2load with a per-request log (latency percentiles: h2load's summary has none). Requests that
    failed (status -1: reset, closed, timed out) or answered outside 2xx/3xx are errors; without -D,
    requests never completed are errors too. A run that does not end by itself is killed and counted
    as all errors, not allowed to hang the benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "requests.log")
        cmd = _pin(cpus) + ["h2load", *args, f"--log-file={log}", url]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            out = proc.stdout + proc.stderr
            if proc.returncode != 0:
                out += f"\n(h2load exit status {proc.returncode})"
        except subprocess.TimeoutExpired as e:
            def text(b) -> str:
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            out = text(e.stdout) + text(e.stderr) + f"\n(h2load killed after {timeout_s:.0f} s: it did not finish)"
        latencies_ms: list[float] = []
        bad = 0
        if os.path.exists(log):
            with open(log) as f:
                for line in f:
                    parts = line.split("\t")
                    if len(parts) < 3:
                        continue
                    status = int(parts[1])
                    if status < 0:
                        bad += 1
                        continue
                    if not 200 <= status < 400:
                        bad += 1
                    latencies_ms.append(int(parts[2]) / 1000)
    latencies_ms.sort()
    finished, counts = _H2LOAD_FINISHED.search(out), _H2LOAD_REQUESTS.search(out)
    duration_s = float(finished.group(1)) * _UNIT_S[finished.group(2)] if finished else 0.0
    if counts:
        total, _started, done, succeeded, failed = (int(x) for x in counts.groups()[:5])
        errors = failed if duration_mode else total - succeeded
        requests = done
    else:  # no summary: h2load died or was killed; what the log holds is all there is
        requests, errors = len(latencies_ms), max(bad, 1)
    result = LoadResult(requests, duration_s, 0, max(errors, bad), _percentile(latencies_ms, 50),
                        _percentile(latencies_ms, 90), _percentile(latencies_ms, 99),
                        latencies_ms[-1] if latencies_ms else 0.0)
    return H2loadRun(result, out, cmd)


def run_h2load(url: str, *, clients: int, streams: int, duration_s: int, h1: bool = False,
               cpus: str | None = None) -> H2loadRun:
    """Closed loop with h2load: `clients` connections, each keeping `streams` requests in flight
    (HTTP/2 streams; h2c with prior knowledge on an http:// URL), for duration_s seconds."""
    args = ["-c", str(clients), "-m", str(streams), "-t", "1", "-D", str(duration_s)]
    if h1:
        args.insert(0, "--h1")
    return _run_h2load(args, url, timeout_s=duration_s + 30, duration_mode=True, cpus=cpus)


def fixed_rate_args(total_rps: int, duration_s: float, *, clients: int, h1: bool) -> list[str]:
    """h2load arguments for total_rps spread over `clients` keep-alive connections.

    Each client sends at total_rps / clients (--rps, its own timer from its connect), and the clients
    are started one every 1/total_rps seconds (-r 1 --rate-period: h2load's connection rate mode), so
    their timers are out of phase and arrivals come about evenly spaced instead of in bursts of
    `clients`. h2load refuses -D in rate mode, so the run is a request count (-n) over the duration."""
    stagger_ms = max(1, round(1000 / total_rps))
    args = ["-c", str(clients), "-t", "1", "-m", "1", f"--rps={total_rps / clients:g}",
            "-r", "1", f"--rate-period={stagger_ms}ms", "-n", str(round(total_rps * duration_s))]
    return (["--h1"] if h1 else []) + args


def run_fixed_rate_h2load(url: str, *, total_rps: int, duration_s: float, clients: int = 16, h1: bool = True,
                          cpus: str | None = None) -> H2loadRun:
    """A fixed request rate over `clients` connections with staggered starts (see fixed_rate_args)."""
    return _run_h2load(fixed_rate_args(total_rps, duration_s, clients=clients, h1=h1), url,
                       timeout_s=duration_s + 30, duration_mode=False, cpus=cpus)


def median_of(results: list[LoadResult]) -> LoadResult:
    """Element-wise medians over repeated runs of one scenario."""
    def med(values):
        return statistics.median(values)
    return LoadResult(
        requests=int(med([r.requests for r in results])),
        duration_s=med([r.duration_s for r in results]),
        bytes=int(med([r.bytes for r in results])),
        errors=sum(r.errors for r in results),
        p50_ms=med([r.p50_ms for r in results]),
        p90_ms=med([r.p90_ms for r in results]),
        p99_ms=med([r.p99_ms for r in results]),
        max_ms=med([r.max_ms for r in results]),
    )
