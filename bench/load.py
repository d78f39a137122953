"""Load generators driven as a user would: wrk for closed-loop load, h2load for a fixed request rate."""

from __future__ import annotations

import json
import os
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

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.duration_s / (1 << 20) if self.duration_s else 0.0


def _pin(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def run_wrk(url: str, *, connections: int, duration_s: int, threads: int = 1, cpus: str | None = None,
            host_header: str | None = None, timeout_s: int = 5) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_REPORT_LUA)
        script = f.name
    try:
        cmd = _pin(cpus) + ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s",
                            f"--timeout={timeout_s}s", "-s", script]
        if host_header:
            cmd += ["-H", f"Host: {host_header}"]
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


def run_fixed_rate(url: str, *, total_rps: int, duration_s: int, clients: int = 10, cpus: str | None = None,
                   host_header: str | None = None) -> LoadResult:
    """h2load over HTTP/1.1 at a fixed request rate; latency percentiles from its per-request log."""
    per_client = max(1, total_rps // clients)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "requests.log")
        cmd = _pin(cpus) + ["h2load", "--h1", "-c", str(clients), "-t", "1", f"--rps={per_client}",
                            "-D", str(duration_s), f"--log-file={log}"]
        if host_header:
            cmd += ["-H", f"host: {host_header}"]
        cmd.append(url)
        subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True)
        latencies_ms: list[float] = []
        errors = 0
        with open(log) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                status = int(parts[1])
                if not 200 <= status < 400:
                    errors += 1
                latencies_ms.append(int(parts[2]) / 1000)
    latencies_ms.sort()
    return LoadResult(len(latencies_ms), float(duration_s), 0, errors,
                      _percentile(latencies_ms, 50), _percentile(latencies_ms, 90), _percentile(latencies_ms, 99))


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
    )
