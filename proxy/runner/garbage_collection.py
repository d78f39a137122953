"""Garbage-collection policy of a proxy process: the cyclic collector's passes paced for a request path,
and long-lived objects frozen out of them (`settle`, also the control plane's: controlplane/heap.py).

Theory of operation. CPython's cyclic collector starts a young (generation 0) pass every 700
container objects allocated and not yet freed, a generation-1 pass every 10 of those, and a full
pass when enough objects have survived into the old generation. A proxied request allocates on the
order of a hundred containers (coroutines, tuples, lists, its context and stream objects), most of
them freed by reference counting when it ends. Under load many requests are in flight at each
young pass, so their objects survive it and are promoted, and the older passes, the full one
included (the compiled config, the modules: the whole heap), follow from that promotion, not from
garbage: measured with callgrind at 64 h2c connections x 10 streams, the collector took about an
eighth of a request's instructions (275k with the defaults, 240k with the thresholds below).

A young pass every YOUNG_PASS_OBJECTS allocations lets the requests in flight end before it, so
fewer objects are promoted and the older passes become rare. Cyclic garbage (a failed request's
exception and its frames) is still found by the young pass that follows it: a few thousand objects
later, not 700.
"""

from __future__ import annotations

import gc
import time
from typing import NamedTuple

YOUNG_PASS_OBJECTS = 5000  # containers allocated (net) between young passes (CPython's default: 700)
GENERATION1_PASSES = 20  # young passes between generation-1 passes (default 10)
FULL_PASSES = 10  # generation-1 passes before a full pass may start (the default; it also waits until
# the survivors since the last one are a quarter of the old generation; 100 measured the same)


def pace_collector() -> None:
    """Apply the worker's thresholds (process-wide: called once, when the worker starts)."""
    gc.set_threshold(YOUNG_PASS_OBJECTS, GENERATION1_PASSES, FULL_PASSES)


class Settled(NamedTuple):
    full: bool
    collected: int  # unreachable objects found
    frozen: int  # objects the collector skips from now on
    duration_s: float


def settle(full: bool) -> Settled:
    """Collect (everything when `full`, else what is not frozen yet) and freeze the survivors: later
    passes, full ones included, skip them. Frozen objects are never collected, so whoever settles
    more than once also runs a `full` settle now and then."""
    started = time.perf_counter()
    if full:
        gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return Settled(full, collected, gc.get_freeze_count(), time.perf_counter() - started)


def freeze_startup_objects() -> Settled:
    """Everything a worker made before serving (modules, classes, functions: ~35,000 objects, alive
    for the whole run) out of the collector's passes: a full pass over them took 16-25 ms of CPU (at
    load 7), every request of the worker waiting meanwhile, whenever enough new long-lived objects
    (a wave of new connections: slow clients reconnecting after their 408s) started one."""
    return settle(full=False)


__all__ = ["Settled", "freeze_startup_objects", "pace_collector", "settle"]
