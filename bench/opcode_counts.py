"""Bytecodes executed per Python function, for the `--opcodes` modes of the instruction benches:
callgrind shows most of the data path inside CPython's eval loop, this shows whose code it runs.

The measured process calls `count_opcodes(path)` first (it is loaded by file path, so it works when
the process's `sys.path` holds another checkout); the bench subtracts two runs' counts and lists the
functions by bytecodes per unit (request, connection). A bytecode costs ~10-30 instructions (more when
it calls into C); tracing slows the process ~50x, so only counts are comparable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve()


def count_opcodes(path: str) -> None:
    """Count bytecodes per function (sys.settrace opcode events) from now on; written to `path` as
    JSON ({"file:line:qualname": count}) at exit."""
    import atexit
    import collections

    counts: collections.Counter = collections.Counter()

    def local(frame, event, arg):
        if event == "opcode":
            counts[frame.f_code] += 1
        return local

    def on_call(frame, event, arg):
        frame.f_trace_opcodes = True
        return local

    def dump() -> None:
        sys.settrace(None)
        rows = {f"{c.co_filename}:{c.co_firstlineno}:{c.co_qualname}": n for c, n in counts.items()}
        with open(path, "w") as f:
            json.dump(rows, f)

    atexit.register(dump)
    sys.settrace(on_call)


def per_unit(first: dict[str, int], second: dict[str, int], units: int) -> dict[str, float]:
    """Bytecodes per unit by function: the second run's counts less the first's, over the `units` the
    second run did more."""
    return {name: (second.get(name, 0) - first.get(name, 0)) / units for name in {*first, *second}}


def table(counts: dict[str, float], *, top: int, strip: str = "") -> str:
    """The `top` functions, most bytecodes first (`strip`: a path prefix left out of the names)."""
    rows = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return "\n".join(f"{n:9.1f}  {name.replace(strip, '')}" for name, n in rows)
