"""Process accounting from /proc: CPU seconds, peak RSS and command lines of a process tree (Linux only).

CPU time is read from /proc/<pid>/task/<tid>/schedstat, the on-CPU nanoseconds of each thread, because
/proc/<pid>/stat's clock ticks (10 ms) are too coarse for a few seconds of load split over many runs.
"""

from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except FileNotFoundError:
        return kids
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/children") as f:
                kids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return []


def _tick_seconds(pid: int) -> float:
    """utime+stime of the whole process from /proc/<pid>/stat (10 ms resolution); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    # fields[0] is state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid from /proc/<pid>/stat (10 ms ticks): the kernel's share."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def _schedstat_seconds(pid: int) -> float | None:
    """On-CPU time of all threads of pid in ns resolution; None if the kernel has no schedstat."""
    total_ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended between listdir and open
        except (OSError, IndexError, ValueError):
            return None
    return total_ns / 1e9


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user+system, all threads) consumed so far by these processes.

    Threads that already exited are not counted by schedstat; the forwarders measured here keep
    their threads for their whole life, so differences between two readings are exact.
    """
    total = 0.0
    for pid in pids:
        s = _schedstat_seconds(pid)
        total += _tick_seconds(pid) if s is None else s
    return total


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset each process's VmHWM to its current RSS (clear_refs 5), so the next reading is the peak
    of what follows. False when the kernel or permissions refuse (the peak then covers the whole life)."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except FileNotFoundError:
            continue
        except OSError:
            ok = False
    return ok


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of VmHWM (peak resident set) over the processes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except FileNotFoundError:
            continue
    return total


def core_busy_seconds(cpu: int) -> float:
    """Seconds core `cpu` spent running tasks (user, nice, system) or stolen by the hypervisor, from
    /proc/stat, since boot.

    Compared with the forwarder's own CPU over the same window, this says how much of the pinned core
    other processes took: the machine is shared, and that share is what makes figures noisy. irq and
    softirq time are left out: much of it is the loopback traffic of the processes being measured."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in line.split()[1:9])
                return (user + nice + system + steal) / _CLK_TCK  # guest time is already inside user
    raise ValueError(f"no cpu{cpu} in /proc/stat")
