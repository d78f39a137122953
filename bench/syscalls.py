"""Syscalls per request of a proxy process under load, counted with `strace -c` (part of `--profile`).

strace stops the traced threads on every syscall, so throughput while counting means nothing; the
counts divided by the requests served in the same window do: they show where the kernel time (about a
third of the per-request CPU for a Python proxy) comes from, next to Envoy's counts.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def available() -> bool:
    return shutil.which("strace") is not None


def count(pid: int, out: Path, run_load: Callable[[], int], *, cpus: str | None = None) -> tuple[dict[str, int], int]:
    """Attach `strace -c -f` to pid (all its threads), run the load (returns requests served), detach.
    Returns {syscall: calls} and the request count."""
    pin = ["taskset", "-c", cpus] if cpus else []
    tracer = subprocess.Popen(pin + ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # attached to every thread before the load starts
        requests = run_load()
    finally:
        tracer.send_signal(signal.SIGINT)  # detach: strace writes its summary and exits
        try:
            tracer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    return parse(out.read_text() if out.exists() else ""), requests


def parse(text: str) -> dict[str, int]:
    """`strace -c` table -> {syscall: calls, "syscall (failed)": errors}; failed calls are mostly EAGAIN,
    i.e. reads tried before the data was there."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) in (5, 6) and parts[-1] != "total" and parts[3].isdigit():
            calls[parts[-1]] = int(parts[3])
            if len(parts) == 6 and parts[4].isdigit() and int(parts[4]):
                calls[f"{parts[-1]} (failed)"] = int(parts[4])
    return calls


def table(per_target: dict[str, tuple[dict[str, int], int]], *, top: int = 15) -> str:
    """Syscalls per request side by side, the most frequent (over all targets) first."""
    names = sorted({n for calls, _ in per_target.values() for n in calls},
                   key=lambda n: -max(calls.get(n, 0) / max(1, req) for calls, req in per_target.values()))
    targets = list(per_target)
    lines = ["Syscalls per request (strace -c on all threads, same c64 load; throughput under strace is "
             "meaningless, the counts per request are not):",
             f"{'syscall':<22}" + "".join(f"{t:>12}" for t in targets)]
    for n in names[:top]:
        lines.append(f"{n:<22}" + "".join(f"{per_target[t][0].get(n, 0) / max(1, per_target[t][1]):>12.2f}"
                                         for t in targets))
    lines.append(f"{'total':<22}" + "".join(
        f"{sum(v for k, v in c.items() if not k.endswith('(failed)')) / max(1, r):>12.2f}" for c, r in per_target.values()))
    lines.append(f"{'(requests counted)':<22}" + "".join(f"{r:>12d}" for _, r in per_target.values()))
    return "\n".join(lines) + "\n"
