"""Garbage-collection policy of the control plane: the long-lived per-proxy objects stay out of the
collector's passes.

Theory of operation. A control plane holds, per connected proxy, a stream, its socket, its task and
bookkeeping: hundreds of thousands of objects at 10,000 proxies, alive for hours. CPython's cyclic
collector traverses all of them in each full (generation 2) pass, which it starts on its own when
enough objects have survived the younger passes, that is during bursts of work: measured at 10,000
proxies over three replicas, 4-5 full passes per replica over a bench run, 0.2-0.8 s each on the
loaded machine, some of them in the middle of a push round, stopping every push and ACK of that
replica meanwhile.

So, once the control plane has been quiet for a moment (no change, no proxy connecting, no push
round; see ControlPlane._settle_heap), `settle` collects the objects made since the last settle and
freezes every survivor (gc.freeze): later passes, full ones included, skip them. Frozen objects are
never collected, so a proxy that leaves would leave its cyclic garbage (a Trio task's frames) behind
for good; every FULL_COLLECT_S the settle unfreezes first and runs one full pass, at a quiet time.
"""

from __future__ import annotations

from proxy.runner.garbage_collection import Settled, settle

QUIET_S = 1.0  # quiet time before a settle
FULL_COLLECT_S = 600.0  # a full pass over the frozen objects at most this often (and at least, when quiet)

__all__ = ["FULL_COLLECT_S", "QUIET_S", "Settled", "settle"]
