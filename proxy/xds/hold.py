"""Holding the control-plane client's reconnects while a hot restart hands the node to a new process."""

from __future__ import annotations

import trio


class ReconnectHold:
    """Holds the client's reconnects while a hot restart hands this proxy over to a new process of
    the same node (proxy/runner/hot_restart.py): the stream stays up while this process serves, and
    once the control plane replaces it with the new process's, it is not made again, so the two
    processes do not take the node id from each other in turn. Released when the handover fails."""

    def __init__(self) -> None:
        self._released = trio.Event()
        self._released.set()

    @property
    def held(self) -> bool:
        return not self._released.is_set()

    def hold(self) -> None:
        if not self.held:
            self._released = trio.Event()

    def release(self) -> None:
        self._released.set()

    async def wait_released(self) -> None:
        await self._released.wait()
