"""Debounce and the coalescing push queue, with an injected clock."""

from __future__ import annotations

from controlplane.pushqueue import Debouncer, PushQueue


def test_a_burst_becomes_one_push_after_the_quiet_time():
    d = Debouncer(quiet_s=0.1, max_delay_s=1.0)
    assert d.due_at() is None and d.take(0.0) == 0
    for i in range(20):
        d.event(10.0 + i * 0.01)  # 20 changes 10 ms apart
    assert d.due_at() == 10.19 + 0.1
    assert d.take(10.25) == 0
    assert d.take(10.3) == 20
    assert not d.pending and d.take(11.0) == 0


def test_a_steady_stream_is_pushed_at_the_max_delay():
    d = Debouncer(quiet_s=0.1, max_delay_s=1.0)
    pushed_at = []
    for step in range(50):  # a change every 50 ms for 2.5 s, never 100 ms quiet
        d.event(step / 20)
        now = (step + 1) / 20
        if d.take(now):
            pushed_at.append(now)
    assert pushed_at == [1.0, 2.0]
    assert d.pending  # the tail of the stream waits for its quiet time


def test_queue_coalesces_and_keeps_order():
    q = PushQueue()
    for p in ["a", "b", "a", "c", "b"]:
        q.enqueue(p)
    assert len(q) == 3
    assert [q.pop(), q.pop(), q.pop(), q.pop()] == ["a", "b", "c", None]


def test_enqueue_during_a_push_requeues_after_it():
    q = PushQueue()
    q.enqueue("a")
    assert q.pop() == "a" and q.in_flight == 1
    q.enqueue("a")
    q.enqueue("a")
    assert len(q) == 0  # not handed to a second sender while in flight
    q.done("a")
    assert len(q) == 1 and q.pop() == "a"
    q.done("a")
    assert q.pop() is None


def test_remove_forgets_a_proxy_everywhere():
    q = PushQueue()
    q.enqueue("a")
    q.enqueue("b")
    assert q.pop() == "a"
    q.enqueue("a")
    q.remove("a")
    q.remove("b")
    q.done("a")
    assert q.pop() is None and q.in_flight == 0
