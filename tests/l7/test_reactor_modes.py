"""The reactor's two modes on real socket pairs: direct when quiet (each wait is Trio's own), batching
when a probe sees load, back to direct after a window of lone events, with no wait lost at either
switch; a parked wait keeps it batching; a timeout's interrupt ends a direct wait like any other."""

from __future__ import annotations

import math
import socket

import pytest
import trio

from proxy.l7.connio import Conn
from proxy.l7.reactor import WINDOW_POLLS, WINDOW_S, Reactor


def _pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(count)]


async def _fill_waiting(conn: Conn) -> None:
    await conn.fill(wait_first=True)


async def _echo_rounds(reactor: Reactor, pairs, rounds: int, *, together: bool) -> None:
    """Each round writes one byte to every pair's far end (all at once, or one pair after the other)
    and waits until every near end's Conn has read it."""
    conns = [Conn(ours, reactor=reactor) for ours, _ in pairs]
    for _ in range(rounds):
        if together:
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(_fill_waiting, conn)
                await trio.testing.wait_all_tasks_blocked()  # all of them wait before their bytes come
                for _, theirs in pairs:
                    theirs.send(b"x")
        else:
            for conn, (_, theirs) in zip(conns, pairs):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_fill_waiting, conn)
                    await trio.sleep(0.001)  # the reader is waiting before its byte comes
                    theirs.send(b"x")
    for conn in conns:
        assert conn.buffered == rounds
        conn.close()


async def test_a_quiet_worker_waits_directly_and_never_batches_before_a_probe():
    reactor = Reactor(probe_s=math.inf)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        await _echo_rounds(reactor, _pairs(4), 20, together=False)
        assert not reactor.batching
        assert reactor.mode_changes == 0
        nursery.cancel_scope.cancel()


async def test_a_probe_batches_while_many_fds_are_ready_at_once_and_goes_direct_after_lone_events():
    reactor = Reactor(probe_s=0.0)  # the first wait probes
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        pairs = _pairs(16)
        await _echo_rounds(reactor, pairs, WINDOW_POLLS * 2, together=True)  # ~16 events per poll
        assert reactor.batching
        assert reactor.mode_changes == 1
        reactor.probe_s = math.inf
        await _echo_rounds(reactor, _pairs(2), WINDOW_POLLS * 2, together=False)  # one event per poll
        assert not reactor.batching
        assert reactor.mode_changes == 2
        nursery.cancel_scope.cancel()


async def test_tasks_waiting_on_the_set_when_it_goes_direct_still_get_their_bytes():
    reactor = Reactor(probe_s=0.0, min_batch=math.inf)  # batching at the first wait; direct after one window
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        waiting = _pairs(3)
        conns = [Conn(ours, reactor=reactor) for ours, _ in waiting]
        got: list[int] = []

        async def read(conn: Conn) -> None:
            got.append(await conn.fill(wait_first=True))

        for conn in conns:
            nursery.start_soon(read, conn)
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.batching  # they wait on the set
        reactor.probe_s = math.inf
        await _echo_rounds(reactor, _pairs(1), WINDOW_POLLS + 2, together=False)
        assert not reactor.batching
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # woken to wait again, now directly: nothing was read yet
        for _, theirs in waiting:
            theirs.send(b"late")
        with trio.fail_after(5):
            while len(got) < 3:
                await trio.sleep(0.001)
        assert got == [4, 4, 4]
        for conn in conns:
            conn.close()
        nursery.cancel_scope.cancel()


async def test_a_load_that_returns_is_batched_again_at_the_next_probe():
    reactor = Reactor(probe_s=0.05, min_batch=math.inf)  # every window goes direct
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        pairs = _pairs(2)
        await _echo_rounds(reactor, pairs, 3, together=False)
        assert not reactor.batching and reactor.mode_changes == 0  # the first probe is not due yet
        await trio.sleep(0.06)
        ours, theirs = socket.socketpair()
        conn = Conn(ours, reactor=reactor)
        theirs.send(b"y")
        assert await conn.fill(wait_first=True) == 1  # this wait was the probe
        assert reactor.batching and reactor.mode_changes == 1
        conn.close()
        nursery.cancel_scope.cancel()


async def test_a_parked_wait_turns_batching_on_and_keeps_it_while_it_waits():
    reactor = Reactor(probe_s=math.inf, min_batch=math.inf)  # direct, and every window would go direct
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        ours, theirs = socket.socketpair()
        slow = Conn(ours, reactor=reactor)

        async def read_slowly() -> None:
            await slow.fill_parked(lambda buf, pos: len(buf) - pos >= 3)

        nursery.start_soon(read_slowly)
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.batching
        await _echo_rounds(reactor, _pairs(1), WINDOW_POLLS * 2, together=False)
        assert reactor.batching  # lone events, but a parked reader needs the set's dispatch
        for byte in b"abc":
            theirs.send(bytes([byte]))
            await trio.sleep(0.005)
        with trio.fail_after(5):
            while slow.buffered < 3:
                await trio.sleep(0.001)
        assert reactor.parked_reads >= 2  # the bytes were read by the set's parked queue
        await _echo_rounds(reactor, _pairs(1), WINDOW_POLLS + 2, together=False)
        assert not reactor.batching  # nothing parked any more: lone events go direct
        slow.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("batching", [False, True], ids=["direct", "batching"])
async def test_an_interrupt_ends_a_wait_in_either_mode(batching):
    reactor = Reactor(probe_s=0.0 if batching else math.inf, min_batch=0.0)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        ours, _theirs = socket.socketpair()
        conn = Conn(ours, reactor=reactor)
        result: list[str] = []

        async def read() -> None:
            try:
                await conn.fill(wait_first=True)
            except ConnectionAbortedError as error:
                result.append(str(error))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.batching is batching
        reactor.interrupt(conn.fd)
        with trio.fail_after(5):
            while not result:
                await trio.sleep(0.001)
        assert result == ["connection closed while waiting to read"]
        conn.close()
        nursery.cancel_scope.cancel()


async def test_at_a_low_rate_a_window_ends_by_time_not_after_sixteen_polls():
    reactor = Reactor(probe_s=0.0)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        ours, theirs = socket.socketpair()
        conn = Conn(ours, reactor=reactor)
        for _ in range(5):  # a lone event every 30 ms: WINDOW_S is shorter
            theirs.send(b"z")
            await conn.fill(wait_first=True)
            reactor.probe_s = math.inf
            await trio.sleep(WINDOW_S * 1.5)
        assert not reactor.batching and reactor.mode_changes == 2
        conn.close()
        nursery.cancel_scope.cancel()


async def test_the_edges_of_a_direct_period_do_not_count_as_load_when_a_probe_batches():
    reactor = Reactor(probe_s=0.3)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        kept = _pairs(60)
        conns = [Conn(ours, reactor=reactor) for ours, _ in kept]
        for conn, (_, theirs) in zip(conns, kept):  # 60 fds see an edge each, read directly
            theirs.send(b"x")
            await conn.fill(wait_first=True)
        assert not reactor.batching
        await trio.sleep(0.3)
        ours, theirs = socket.socketpair()
        lone = Conn(ours, reactor=reactor)
        for _ in range(2):  # the first wait probes; the set's first poll returns the 60 (left out)
            async with trio.open_nursery() as reading:
                reading.start_soon(_fill_waiting, lone)
                await trio.sleep(WINDOW_S * 1.25)
                theirs.send(b"y")
        assert reactor.mode_changes == 2 and not reactor.batching  # two lone polls made the window
        lone.close()
        for conn in conns:
            conn.close()
        nursery.cancel_scope.cancel()


async def test_it_goes_direct_at_most_once_per_probe_interval_even_when_parked_reads_batch_it():
    reactor = Reactor(probe_s=math.inf)
    async with trio.open_nursery() as nursery:
        reactor.ensure_running(nursery)
        for _ in range(2):
            ours, theirs = socket.socketpair()
            slow = Conn(ours, reactor=reactor)
            async with trio.open_nursery() as reading:
                reading.start_soon(slow.fill_parked, lambda buf, pos: len(buf) - pos >= 2)
                await trio.testing.wait_all_tasks_blocked()
                assert reactor.batching
                theirs.send(b"ab")
            slow.close()
            await _echo_rounds(reactor, _pairs(1), WINDOW_POLLS + 2, together=False)
        assert reactor.batching  # the second time, lone events did not switch it back within probe_s
        assert reactor.mode_changes == 3
        nursery.cancel_scope.cancel()


async def test_when_the_set_task_ends_its_waiters_wait_again_directly():
    reactor = Reactor(probe_s=0.0, min_batch=0.0)
    ours, theirs = socket.socketpair()
    conn = Conn(ours, reactor=reactor)
    got: list[int] = []
    async with trio.open_nursery() as outer:

        async def read() -> None:
            got.append(await conn.fill(wait_first=True))

        async with trio.open_nursery() as reactor_nursery:
            reactor.ensure_running(reactor_nursery)
            outer.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.batching  # it waits on the set
            reactor_nursery.cancel_scope.cancel()
        assert not reactor.running and not reactor.batching
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # not failed: waiting again, directly
        theirs.send(b"after")
    assert got == [5]
    conn.close()
