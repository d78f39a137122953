"""The reactor's parked reads on real socket pairs: readers run at most PARKED_BATCH per scheduler
batch with other tasks running between, a burst larger than one poll's POLL_EVENTS loses nothing, a
parked task wakes only when its reader says so, and a timeout's interrupt or a cancellation ends a
parked wait like any other."""

from __future__ import annotations

import socket

import pytest
import trio
from trio.lowlevel import checkpoint

from proxy.l7.reactor import PARKED_BATCH, POLL_EVENTS, Reactor


class Reader:
    """Reads what its socket holds; wakes its task once `wake_after` bytes came. Records the ticker's
    count at each read."""

    def __init__(self, sock: socket.socket, wake_after: int, ticks: list[int]) -> None:
        self.sock = sock
        self.wake_after = wake_after
        self.ticks = ticks
        self.received = b""
        self.read_at_ticks: list[int] = []

    def read_parked(self) -> bool:
        self.read_at_ticks.append(self.ticks[0])
        try:
            self.received += self.sock.recv(65536)
        except BlockingIOError:
            return False
        return len(self.received) >= self.wake_after


def _pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = [socket.socketpair() for _ in range(count)]
    for ours, _ in pairs:
        ours.setblocking(False)
    return pairs


async def test_a_burst_is_read_in_bounded_batches_and_each_task_wakes_once_its_reader_says_so():
    ticks = [0]
    reactor = Reactor()
    count = POLL_EVENTS + 2 * PARKED_BATCH + 5  # more than one poll takes, too
    pairs = _pairs(count)
    readers = [Reader(ours, 2, ticks) for ours, _ in pairs]
    woken: list[bytes] = []

    async def parked(fd: int, reader: Reader) -> None:
        await reactor.wait_parked(fd, reader)
        woken.append(reader.received)

    async def ticker() -> None:  # another task of the worker: how often it ran while the burst was read
        while True:
            ticks[0] += 1
            await checkpoint()

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                reactor.ensure_running(nursery)
                nursery.start_soon(ticker)
                for (ours, _), reader in zip(pairs, readers):
                    reactor.register(ours.fileno())
                    nursery.start_soon(parked, ours.fileno(), reader)
                await trio.sleep(0.05)
                for _, theirs in pairs:  # one byte each, all at once: not enough to wake anyone
                    theirs.send(b"a")
                while sum(len(r.read_at_ticks) for r in readers) < count:
                    await trio.sleep(0.01)
                assert woken == []
                for _, theirs in pairs:  # the second byte wakes every task
                    theirs.send(b"b")
                while len(woken) < count:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert sorted(woken) == [b"ab"] * count
    assert reactor.parked_reads == 2 * count
    first_burst = [r.read_at_ticks[0] for r in readers]
    per_tick: dict[int, int] = {}
    for tick in first_burst:
        per_tick[tick] = per_tick.get(tick, 0) + 1
    # Trio may run the two tasks in either order within a scheduler batch, so at most two batches
    # share a tick; the burst spans several ticks (read all at once, it would be one tick)
    assert max(per_tick.values()) <= 2 * PARKED_BATCH
    assert max(first_burst) - min(first_burst) >= 3


@pytest.mark.parametrize("how", ["interrupt", "cancel", "forget"])
async def test_a_parked_wait_ends_on_interrupt_cancellation_or_forget(how):
    reactor = Reactor()
    (ours, theirs), = _pairs(1)
    reader = Reader(ours, 100, [0])
    outcome: list[str] = []
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                reactor.ensure_running(nursery)
                reactor.register(ours.fileno())

                async def parked(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with trio.CancelScope() as scope:
                        task_status.started(scope)
                        try:
                            await reactor.wait_parked(ours.fileno(), reader)
                            outcome.append("woken")
                        except trio.ClosedResourceError:
                            outcome.append("closed")
                    if scope.cancelled_caught:
                        outcome.append("cancelled")

                scope = await nursery.start(parked)
                theirs.send(b"x")
                while not reader.received:
                    await trio.sleep(0.01)
                if how == "interrupt":
                    reactor.interrupt(ours.fileno())
                elif how == "forget":
                    reactor.forget(ours.fileno())
                else:
                    scope.cancel()
                while not outcome:
                    await trio.sleep(0.01)
                # the fd is no longer parked: later bytes are not read for anyone
                reads = reactor.parked_reads
                theirs.send(b"y")
                await trio.sleep(0.05)
                assert reactor.parked_reads == reads
                nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()
    assert outcome == {"interrupt": ["closed"], "forget": ["closed"], "cancel": ["cancelled"]}[how]


async def test_a_reader_that_raises_fails_its_own_wait_only():
    reactor = Reactor()
    pairs = _pairs(2)
    ticks = [0]
    broken, healthy = Reader(pairs[0][0], 1, ticks), Reader(pairs[1][0], 1, ticks)

    def raise_bug() -> bool:
        raise ValueError("a bug in a reader")

    broken.read_parked = raise_bug
    results: dict[str, object] = {}

    async def parked(name: str, fd: int, reader) -> None:
        try:
            await reactor.wait_parked(fd, reader)
            results[name] = "woken"
        except ValueError as error:
            results[name] = error

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                reactor.ensure_running(nursery)
                for name, (ours, _), reader in (("broken", pairs[0], broken), ("healthy", pairs[1], healthy)):
                    reactor.register(ours.fileno())
                    nursery.start_soon(parked, name, ours.fileno(), reader)
                await trio.sleep(0.05)
                for _, theirs in pairs:
                    theirs.send(b"x")
                while len(results) < 2:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert isinstance(results["broken"], ValueError) and results["healthy"] == "woken"
