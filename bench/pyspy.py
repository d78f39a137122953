"""`python -m bench --profile`: sample a triomesh worker with py-spy under load, and turn the samples
into a flame graph (SVG) and a text summary of where the time goes.

py-spy records collapsed stacks ("outer;...;inner count" per line); the summary and the SVG are made
here from those, so one recording gives both. Frames are merged per function (line numbers dropped)
for the flame graph and the function tables; one table keeps line numbers for the hottest lines.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import cmdline

_LINE_NO = re.compile(r":\d+\)$")


def ensure_py_spy() -> str:
    """py-spy next to this interpreter (installed into this venv with pip if missing)."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        found = shutil.which("py-spy")
        if found:
            return found
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"])
        if r.returncode != 0 or not exe.exists():
            sys.exit(f"--profile needs py-spy: `{sys.executable} -m pip install py-spy` failed")
    return str(exe)


def worker_pids(pids: list[int]) -> list[int]:
    """The triomesh worker processes (`python -m proxy.runner.worker`) among a process tree."""
    return [p for p in pids if "proxy.runner.worker" in cmdline(p)]


def start_recording(py_spy: str, pid: int, out: Path, *, duration_s: int, rate_hz: int = 250,
                    cpus: str | None = None) -> subprocess.Popen:
    """Start `py-spy record` (collapsed stacks) on pid for duration_s; the caller waits on the process."""
    pin = ["taskset", "-c", cpus] if cpus else []
    cmd = pin + [py_spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--duration", str(duration_s),
                 "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def _function(frame: str) -> str:
    return _LINE_NO.sub(")", frame)


def _file(frame: str) -> str:
    """'func (path/file.py:12)' -> 'path/file.py'."""
    inner = frame.rpartition(" (")[2].rstrip(")")
    return inner.rsplit(":", 1)[0] if inner[-1:].isdigit() else inner


def summary(stacks: list[tuple[list[str], int]], *, title: str, top: int = 30, preface: str = "") -> str:
    """Self and inclusive sample shares per function, and the hottest lines."""
    total = sum(c for _, c in stacks)
    if not total:
        return f"{title}\n\nno samples (was the worker busy?)\n"
    self_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_file: Counter[str] = Counter()
    for frames, count in stacks:
        self_fn[_function(frames[-1])] += count
        self_file[_file(frames[-1])] += count
        self_line[frames[-1]] += count
        for fn in {_function(f) for f in frames}:  # once per stack, however deep the recursion
            incl_fn[fn] += count

    def table(counter: Counter[str], heading: str) -> list[str]:
        out = [heading, f"{'share':>7} {'samples':>8}  frame"]
        out += [f"{100 * n / total:6.1f}% {n:8d}  {name}" for name, n in counter.most_common(top)]
        return out + [""]

    lines = [title, f"{total} samples (time inside a C call, e.g. a socket syscall, is charged to the Python"
             " frame that made it)", ""]
    if preface:
        lines += [preface, ""]
    lines += table(self_file, "Self time by file:")
    lines += table(self_fn, "Self time by function (the frame on CPU):")
    lines += table(incl_fn, "Inclusive time by function (on the stack):")
    lines += table(self_line, "Self time by line:")
    return "\n".join(lines)


@dataclass
class _Node:
    name: str
    count: int = 0
    children: dict[str, "_Node"] = field(default_factory=dict)


def _tree(stacks: list[tuple[list[str], int]]) -> _Node:
    root = _Node("all")
    for frames, count in stacks:
        root.count += count
        node = root
        for f in frames:
            fn = _function(f)
            node = node.children.setdefault(fn, _Node(fn))
            node.count += count
    return root


def _color(name: str) -> str:
    h = zlib.crc32(name.encode())
    return f"rgb({205 + h % 50},{80 + (h >> 8) % 120},{30 + (h >> 16) % 40})"


def flamegraph_svg(stacks: list[tuple[list[str], int]], *, title: str, width: int = 1400,
                   row_h: int = 16, min_share: float = 0.001) -> str:
    """An icicle-style flame graph (callers above callees); hover a box for its name and share.
    Boxes under `min_share` of all samples are left out to keep the file small."""
    root = _tree(stacks)
    total = max(1, root.count)
    boxes: list[tuple[float, int, float, _Node]] = []  # x, depth, w, node
    depth_max = 0

    def walk(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        w = width * node.count / total
        boxes.append((x, depth, w, node))
        depth_max = max(depth_max, depth)
        for child in sorted(node.children.values(), key=lambda n: n.name):
            if child.count / total >= min_share:
                walk(child, x, depth + 1)
            x += width * child.count / total

    walk(root, 0.0, 0)
    top = 40
    height = top + (depth_max + 1) * row_h + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<rect width="100%" height="100%" fill="#fdfdf5"/>',
           f'<text x="6" y="18" font-size="14">{html.escape(title)}</text>',
           f'<text x="6" y="34" fill="#555">{total} samples; width = share of samples; hover for details</text>']
    for x, depth, w, node in boxes:
        y = top + depth * row_h
        label = f"{node.name} ({node.count} samples, {100 * node.count / total:.1f}%)"
        out.append(f'<g><title>{html.escape(label)}</title><rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" '
                   f'height="{row_h - 1}" fill="{_color(node.name)}"/>')
        chars = int(w / 6.8)
        if chars >= 4:
            text = node.name if len(node.name) <= chars else node.name[: chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + row_h - 4}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
