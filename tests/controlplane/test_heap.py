"""The garbage-collection policy: a settle freezes what survives, a full settle also reclaims cycles
among the frozen objects."""

from __future__ import annotations

import gc
import weakref

from controlplane import heap


class _Node:
    pass


def test_a_frozen_cycle_outlives_collections_until_a_full_settle() -> None:
    try:
        node = _Node()
        node.itself = node  # a cycle: only the cyclic collector frees it
        alive = weakref.ref(node)
        first = heap.settle(full=False)
        assert not first.full and first.frozen == gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: no pass looks at it
        settled = heap.settle(full=True)
        assert settled.full and settled.collected >= 1 and alive() is None
    finally:
        gc.unfreeze()


def test_a_settle_collects_the_unfrozen_cycles_first() -> None:
    try:
        node = _Node()
        node.itself = node
        alive = weakref.ref(node)
        del node
        heap.settle(full=False)  # not frozen: garbage made before the settle is collected by it
        assert alive() is None
    finally:
        gc.unfreeze()
