"""The one mutable reference a worker serves from: the current Snapshot, swapped atomically."""

from __future__ import annotations

from proxy.config.snapshot import EMPTY_SNAPSHOT, Snapshot


class SnapshotHolder:
    """Readers take `holder.current` once per request and keep it; `swap` rebinds the reference.

    Trio runs one task at a time, so rebinding one attribute is atomic for every reader.
    """

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot = EMPTY_SNAPSHOT) -> None:
        self.current = snapshot

    def swap(self, snapshot: Snapshot) -> Snapshot:
        old, self.current = self.current, snapshot
        return old
