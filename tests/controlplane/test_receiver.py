"""One task receiving for many streams (controlplane/receiver.py) on real socket pairs: every message
reaches its stream's handler in order, work a handler returns runs in the stream's task, and a stream
ends on the peer's close, a bad frame, a handler's ProtocolError or a local close."""

from __future__ import annotations

import socket

import trio

from controlplane.framed import FramedStream
from controlplane.receiver import Receiver
from controlplane.wire import Ack, Heartbeat, ProtocolError, encode_frame


def _pair() -> tuple[FramedStream, socket.socket]:
    ours, theirs = socket.socketpair()
    return FramedStream(ours), theirs


async def test_many_streams_each_get_their_messages_in_order():
    receiver = Receiver()
    streams = [_pair() for _ in range(40)]
    got: dict[int, list[int]] = {i: [] for i in range(len(streams))}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        for i, (framed, _) in enumerate(streams):
            nursery.start_soon(receiver.receive, framed, lambda m, i=i: got[i].append(m.seq))
        await trio.sleep(0.05)
        assert len(receiver) == len(streams)
        for round_ in range(3):
            for i, (_, peer) in enumerate(streams):
                frames = b"".join(encode_frame(Heartbeat(seq=10 * round_ + k)) for k in range(3))
                if i % 2:  # split mid-frame: the rest arrives with a later read
                    peer.send(frames[:5])
                    await trio.sleep(0.01)
                    peer.send(frames[5:])
                else:
                    peer.send(frames)
        with trio.fail_after(5):
            while any(len(seqs) < 9 for seqs in got.values()):
                await trio.sleep(0.01)
        for _, peer in streams:
            peer.close()  # each stream's task returns at the end of its stream
        with trio.fail_after(5):
            while len(receiver):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert all(seqs == [0, 1, 2, 10, 11, 12, 20, 21, 22] for seqs in got.values()), got


async def test_work_runs_in_the_streams_task_in_order_and_messages_before_the_close_arrive():
    receiver = Receiver()
    framed, peer = _pair()
    done: list[str] = []

    def handler(message):
        if isinstance(message, Ack):
            async def answer() -> None:
                await trio.sleep(0.01)  # awaiting here stalls this stream only
                done.append(f"work {message.nonce}")
            return answer
        done.append(f"heartbeat {message.seq}")
        return None

    peer.send(encode_frame(Ack(version="v", nonce="1")) + encode_frame(Heartbeat(seq=1))
              + encode_frame(Ack(version="v", nonce="2")))
    peer.close()  # the end of the stream right behind them
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        with trio.fail_after(5):
            await receiver.receive(framed, handler)
        nursery.cancel_scope.cancel()
    # the handler ran as messages came; the work after, in its own order
    assert done == ["heartbeat 1", "work 1", "work 2"]
    assert len(receiver) == 0


async def test_a_bad_frame_or_a_handlers_protocol_error_ends_only_that_stream():
    receiver = Receiver()
    bad, bad_peer = _pair()
    refused, refused_peer = _pair()
    good, good_peer = _pair()
    seen: list[int] = []
    errors: dict[str, ProtocolError] = {}

    async def receive(name: str, framed: FramedStream, handler) -> None:
        try:
            await receiver.receive(framed, handler)
        except ProtocolError as e:
            errors[name] = e

    def refuse(message):
        raise ProtocolError("UNKNOWN_NONCE", "ack for a nonce that was not sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        nursery.start_soon(receive, "bad", bad, seen.append)
        nursery.start_soon(receive, "refused", refused, refuse)
        nursery.start_soon(receive, "good", good, lambda m: seen.append(m.seq))
        await trio.sleep(0.05)
        bad_peer.send(b"\x00\x00\x00\x02\xc1\xc1")  # a body that is not MessagePack
        refused_peer.send(encode_frame(Ack(version="v", nonce="9")))
        good_peer.send(encode_frame(Heartbeat(seq=7)))
        with trio.fail_after(5):
            while len(errors) < 2 or not seen:
                await trio.sleep(0.01)
        assert errors["bad"].code == "MALFORMED" and errors["refused"].code == "UNKNOWN_NONCE"
        assert seen == [7] and len(receiver) == 1  # the good stream is still read
        good_peer.send(encode_frame(Heartbeat(seq=8)))
        with trio.fail_after(5):
            while seen != [7, 8]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for s in (bad_peer, refused_peer, good_peer):
        s.close()


async def test_a_stream_closed_by_another_task_ends_its_receive():
    receiver = Receiver()
    framed, peer = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        ended = trio.Event()

        async def receive() -> None:
            await receiver.receive(framed, lambda m: None)
            ended.set()

        nursery.start_soon(receive)
        await trio.sleep(0.05)
        assert len(receiver) == 1
        await framed.aclose()  # e.g. the keepalive giving up on it, or the proxy replaced
        with trio.fail_after(5):
            await ended.wait()
        assert len(receiver) == 0
        # a new stream may get the same file descriptor: it is read, not mistaken for the old one
        again, again_peer = _pair()
        seen: list[int] = []
        nursery.start_soon(receiver.receive, again, lambda m: seen.append(m.seq))
        await trio.sleep(0.05)
        again_peer.send(encode_frame(Heartbeat(seq=3)))
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        assert seen == [3]
        nursery.cancel_scope.cancel()
    peer.close()
    again_peer.close()


async def test_a_stream_already_closed_returns_at_once():
    receiver = Receiver()
    framed, peer = _pair()
    await framed.aclose()
    with trio.fail_after(1):
        await receiver.receive(framed, lambda m: None)
    assert len(receiver) == 0
    peer.close()
