"""Hot restart side by side: triomesh (--hot-restart-socket) and Envoy (--restart-epoch), same load.

    python -m bench.hot_restart [--reps 3] [--duration 8]

Per repetition and target: generation 0 serves the nginx backend; wrk (32 keep-alive connections)
runs for `--duration` seconds while a prober opens a fresh connection every 5 ms (one request each);
2 s in, generation 1 is started with the same config and the hot restart path (triomesh) or
`--restart-epoch 1` and the same `--base-id` (Envoy). Reported: wrk's requests and errors (connect,
read, write, timeout, non-2xx), its p99 and max latency, the prober's failures (a refused or reset
connect, a non-200) and its latency within 1 s of the handover beside the rest, and how long the old
generation took to exit. Not part of `make test`: it needs nginx, wrk and Envoy (bench/__main__.py
installs them) and takes about a minute.

Envoy drains its old generation for `--drain-time-s` and exits at `--parent-shutdown-time-s`; both
are set to match triomesh's --drain-duration (5 s) so the two old processes get the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.__main__ import ensure_tools
from bench.targets import (
    _ENVOY_HTTP_FILTER,
    _envoy_config,
    free_port,
    start_nginx,
    triomesh_config,
    wait_http_ok,
)

CONNECTIONS = 32
RESTART_AT_S = 2.0
PROBE_INTERVAL_S = 0.005
DRAIN_S = 5
WINDOW_S = 1.0  # probes this close to the handover are "around" it

_WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "non2xx": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_timeout": %d, ' ..
    '"p99_us": %d, "max_us": %d}\n',
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout, latency:percentile(99), latency.max))
end
"""


@dataclass
class Probe:
    """Fresh connections, one request each, every PROBE_INTERVAL_S: (start time, seconds or error)."""

    port: int
    results: list[tuple[float, float | str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        request = b"GET /small HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
        while not self.stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(request)
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                outcome: float | str = time.monotonic() - t0 if data.startswith(b"HTTP/1.1 200") else \
                    f"status {data[:12]!r}"
            except OSError as e:
                outcome = type(e).__name__
            self.results.append((t0, outcome))
            time.sleep(PROBE_INTERVAL_S)


@dataclass
class Generation:
    proc: subprocess.Popen
    log: Path


def _start_triomesh(workdir: Path, config_dir: Path, admin_port: int, socket_path: Path | None,
                    epoch: int) -> Generation:
    log = workdir / f"triomesh-{epoch}.log"
    triomesh = str(Path(sys.executable).with_name("triomesh"))
    cmd = [triomesh, "proxy", "--config", str(config_dir), "--concurrency", "2", "--access-log", "off",
           "--bind-address", "127.0.0.1", "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "info",
           "--drain-duration", f"{DRAIN_S}s"]
    if socket_path is not None:
        cmd += ["--hot-restart-socket", str(socket_path)]
    return Generation(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb")), log)


def _start_replacement(workdir: Path, config_dir: Path, old: Generation) -> Generation:
    """What an operator without hot restart does: a second proxy on the same ports (SO_REUSEPORT,
    its own admin port), ready, then SIGTERM to the old one."""
    admin_port = free_port()
    new = _start_triomesh(workdir, config_dir, admin_port, None, 1)
    wait_http_ok(f"http://127.0.0.1:{admin_port}/ready")
    old.proc.terminate()
    return new


def _start_envoy(workdir: Path, envoy_bin: str, config: Path, base_id: int, epoch: int) -> Generation:
    log = workdir / f"envoy-{epoch}.log"
    cmd = [envoy_bin, "-c", str(config), "--concurrency", "2", "--log-level", "warn",
           "--restart-epoch", str(epoch), "--base-id", str(base_id),
           "--drain-time-s", str(DRAIN_S), "--parent-shutdown-time-s", str(DRAIN_S + 1)]
    return Generation(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb")), log)


def _wrk(port: int, duration_s: int) -> subprocess.Popen:
    fd, script = tempfile.mkstemp(suffix=".lua")
    os.write(fd, _WRK_LUA.encode())
    os.close(fd)
    return subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration_s}s", "--timeout=5s", "-s", script,
                             f"http://127.0.0.1:{port}/small"], stdout=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def one_run(target: str, workdir: Path, backend_port: int, envoy_bin: str, duration_s: int, base_id: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config_dir = workdir / "config"
    envoy_config = workdir / "envoy.yaml"
    if target == "envoy":
        envoy_config.write_text(_envoy_config(_ENVOY_HTTP_FILTER, port=port, admin_port=admin_port,
                                              backend_port=backend_port))
    else:
        config_dir.mkdir(exist_ok=True)
        (config_dir / "bench.yaml").write_text(triomesh_config(port, backend_port))
    socket_path = workdir / "hot-restart.sock" if target == "triomesh" else None

    def start(epoch: int) -> Generation:
        if target == "envoy":
            return _start_envoy(workdir, envoy_bin, envoy_config, base_id, epoch)
        if target == "triomesh-replace" and epoch == 1:
            return _start_replacement(workdir, config_dir, old)
        return _start_triomesh(workdir, config_dir, admin_port, socket_path, epoch)

    old = start(0)
    new = None
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/small")
        wrk = _wrk(port, duration_s)
        probe = Probe(port)
        prober = threading.Thread(target=probe.run, args=(duration_s + 5,))
        prober.start()
        time.sleep(RESTART_AT_S)
        handover_at = time.monotonic()
        new = start(1)
        try:
            old.proc.wait(timeout=duration_s + DRAIN_S + 10)
            old_exit_s = time.monotonic() - handover_at
        except subprocess.TimeoutExpired:
            old_exit_s = float("nan")
        out, _ = wrk.communicate(timeout=duration_s + 60)
        probe.stop.set()
        prober.join(30)
        # the new generation serves on after the old one left
        wait_http_ok(f"http://127.0.0.1:{port}/small", timeout_s=5)
    finally:
        for generation in (new, old):
            if generation is not None:
                _stop(generation.proc)
    w = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    near = [o for t, o in probe.results if abs(t - handover_at) <= WINDOW_S]
    far = [o for t, o in probe.results if abs(t - handover_at) > WINDOW_S]
    failed = [o for _, o in probe.results if isinstance(o, str)]
    return {
        "target": target,
        "requests": w["requests"],
        "errors": w["non2xx"] + w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"],
        "error_kinds": {k: w[k] for k in ("err_connect", "err_read", "err_write", "err_timeout", "non2xx") if w[k]},
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "probes": len(probe.results),
        "probe_failures": len(failed),
        "probe_failure_kinds": sorted(set(failed)),
        "probe_p50_ms_elsewhere": 1000 * statistics.median([o for o in far if isinstance(o, float)] or [0]),
        "probe_max_ms_near_handover": 1000 * max([o for o in near if isinstance(o, float)] or [0]),
        "old_exit_s": round(old_exit_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hot_restart", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds of wrk load per run (the restart is 2 s in)")
    ap.add_argument("--targets", default="triomesh,envoy",
                    help="comma-separated: triomesh, envoy, triomesh-replace (no hot restart: a second proxy on "
                         "the same ports, then SIGTERM to the first, for comparison)")
    args = ap.parse_args()
    envoy_bin = ensure_tools(profile=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hot-restart-bench-") as tmp:
        tmpdir = Path(tmp)
        backend = start_nginx(tmpdir / "nginx", cpus=None)
        try:
            for rep in range(args.reps):
                for target in args.targets.split(","):
                    row = one_run(target, tmpdir / f"{target}-{rep}", backend.port, envoy_bin, args.duration,
                                  base_id=40000 + os.getpid() % 10000 * 10 + rep)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            backend.stop()
    print()
    print("| target | requests | failed | p99 ms | max ms | fresh connections | failed | ms near handover (max) | ms elsewhere (p50) | old exits after s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['requests']:,} | {r['errors']} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['probes']:,} | {r['probe_failures']} | {r['probe_max_ms_near_handover']:.1f} | "
              f"{r['probe_p50_ms_elsewhere']:.1f} | {r['old_exit_s']} |")


if __name__ == "__main__":
    main()
