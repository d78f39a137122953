"""Process accounting from /proc: CPU seconds and peak RSS of a process tree (Linux only)."""

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


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU seconds consumed so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # fields[0] is state (field 3); utime and stime are fields 14 and 15
        total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


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
