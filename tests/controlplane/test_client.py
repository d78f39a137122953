"""The proxy-side client against a scripted control plane on loopback: resync on a delta it cannot
apply, NACK of a body the loader refuses, heartbeats, back-off while the control plane is away."""

from __future__ import annotations

import random
from functools import partial

import msgspec
import trio

from controlplane.framed import FramedStream, StreamClosed
from controlplane.snapshots import StoredResource
from controlplane.wire import Ack, Heartbeat, Hello, Nack, ResourceKey, Snapshot, Welcome, WireResource
from proxy.config.load import load_bytes
from proxy.xds.client import ClientOptions, NodeInfo, backoff_delays, run_client
from proxy.xds.hold import ReconnectHold

from cp_fixtures import SERVICES
from cp_harness import wait_for

FAST = ClientOptions(backoff_initial_s=0.02, backoff_max_s=0.1, welcome_timeout_s=2.0)


def wires(text: str) -> list[WireResource]:
    return [StoredResource.of(r).wire for r in load_bytes(text, "s.yaml")]


class ScriptedPlane:
    """Accepts proxy streams; `script(framed, hello, conn_index)` drives each one."""

    def __init__(self, script) -> None:
        self.script = script
        self.hellos: list[Hello] = []
        self.received: list[list] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream) -> None:
        framed = FramedStream(stream)
        index = len(self.hellos)
        log: list = []
        self.received.append(log)
        try:
            hello = await framed.receive()
            self.hellos.append(hello)
            await framed.send(Welcome(server_id="scripted", heartbeat_interval_s=0.1))
            await self.script(framed, hello, index, log)
        except StreamClosed:
            pass
        finally:
            await framed.aclose()


async def read_answer(framed: FramedStream, log: list, timeout_s: float = 10.0):
    """The next message that is not a heartbeat, within `timeout_s` (heartbeats alone never end it)."""
    with trio.fail_after(timeout_s):
        while True:
            m = await framed.receive()
            log.append(m)
            if not isinstance(m, Heartbeat):
                return m


async def test_delta_on_an_unknown_base_makes_the_client_resync(nursery):
    applied = []
    full = Snapshot(version="v1", nonce="1", resources=wires(SERVICES))

    async def script(framed, hello, index, log):
        if index == 0:
            await framed.send(full)
            assert isinstance(await read_answer(framed, log), Ack)
            # a delta on a base the proxy does not serve: it must drop the stream and resync
            await framed.send(Snapshot(version="v2", nonce="2", full=False, base_version="v0",
                                       removed=[ResourceKey("ServiceEntry", "tutorial", "preference")]))
            await framed.receive()  # until it closes
        else:
            assert hello.last_version == "v1"
            await framed.send(Snapshot(version="v2", nonce="1", resources=wires(SERVICES)[:2]))
            assert isinstance(await read_answer(framed, log), Ack)
            await trio.sleep_forever()

    plane = ScriptedPlane(script)
    port = await nursery.start(plane.serve)
    state = await nursery.start(partial(run_client, options=FAST), ("127.0.0.1", port), NodeInfo("p"),
                                lambda res, v: applied.append((v, len(res))))
    await wait_for(lambda: state.version == "v2", what="resynced")
    assert applied == [("v1", 5), ("v2", 2)] and state.connects == 2
    assert "_Resync" in state.last_disconnect


async def test_a_body_the_loader_refuses_is_nacked_with_the_loader_error(nursery):
    bad = msgspec.msgpack.encode({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                                  "metadata": {"name": "x", "namespace": "tutorial"}, "spec": {"hostz": ["x"]}})
    answers = []

    async def script(framed, hello, index, log):
        await framed.send(Snapshot(version="v1", nonce="1", resources=[WireResource(body=msgspec.Raw(bad), file="se.yaml", document=3)]))
        answers.append(await read_answer(framed, log))
        await framed.send(Snapshot(version="v2", nonce="2", full=False, base_version="", resources=wires(SERVICES)[:1]))
        answers.append(await read_answer(framed, log))
        await trio.sleep_forever()

    plane = ScriptedPlane(script)
    port = await nursery.start(plane.serve)
    applied = []
    state = await nursery.start(partial(run_client, options=FAST), ("127.0.0.1", port), NodeInfo("p"),
                                lambda res, v: applied.append(v))
    await wait_for(lambda: len(answers) == 2, what="two answers")
    nack, ack = answers
    assert isinstance(nack, Nack) and nack.version == "v1" and nack.serving_version == ""
    assert nack.error == "se.yaml: document 3 (ServiceEntry tutorial/x): $.spec.hostz: unknown field `hostz`"
    # a delta on the (empty) set it serves applies
    assert isinstance(ack, Ack) and applied == ["v2"] and state.version == "v2"


async def test_heartbeats_keep_an_idle_stream_and_silence_ends_it(nursery):
    async def script(framed, hello, index, log):
        await framed.send(Snapshot(version="v1", nonce="1"))
        if index == 0:
            async def beat():
                while True:
                    await trio.sleep(0.1)
                    await framed.send(Heartbeat())

            with trio.move_on_after(1.0):  # heartbeats both ways for a second
                async with trio.open_nursery() as n:
                    n.start_soon(beat)
                    while True:
                        log.append(await framed.receive())
            # now go silent: the client must give up on the stream after 3 intervals
            await trio.sleep(2.0)
        else:
            await trio.sleep_forever()

    plane = ScriptedPlane(script)
    port = await nursery.start(plane.serve)
    state = await nursery.start(partial(run_client, options=FAST), ("127.0.0.1", port), NodeInfo("p"),
                                lambda res, v: None)
    await wait_for(lambda: state.connects == 2, timeout_s=5, what="reconnect after silence")
    beats = [m for m in plane.received[0] if isinstance(m, Heartbeat)]
    assert len(beats) >= 5  # every 0.1 s for 1 s
    assert "TooSlowError" in state.last_disconnect


async def test_backoff_while_the_control_plane_is_away_then_connects(nursery):
    with trio.socket.socket() as s:  # a port nobody listens on (yet)
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = await nursery.start(partial(run_client, options=FAST), ("127.0.0.1", port), NodeInfo("p"),
                                lambda res, v: None)
    await trio.sleep(0.3)
    assert not state.connected and state.connects == 0

    async def script(framed, hello, index, log):
        await framed.send(Snapshot(version="v1", nonce="1"))
        await trio.sleep_forever()

    plane = ScriptedPlane(script)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, plane._handle, listeners)
    await wait_for(lambda: state.version == "v1", what="connected once the control plane is up")


def test_backoff_delays_grow_to_the_cap_with_full_jitter():
    rng = random.Random(7)
    gen = backoff_delays(0.1, 5.0, rng)
    delays = [next(gen) for _ in range(2000)]
    caps = [min(5.0, 0.1 * 2.0 ** min(i, 64)) for i in range(2000)]
    assert all(0 <= d <= c for d, c in zip(delays, caps))
    tail = delays[10:]  # at the cap: uniform over [0, 5]
    assert 2.2 < sum(tail) / len(tail) < 2.8 and max(tail) > 4.5 and min(tail) < 0.5


async def test_a_held_client_does_not_reconnect_until_released(nursery):
    """A hot restart hands the node to a new process: once the control plane ends this stream
    (replaced by the new process's), the held client does not make it again; released, it does."""
    replaced = trio.Event()

    async def script(framed, hello, index, log):
        await framed.send(Snapshot(version="v1", nonce=str(index)))
        if index == 0:
            await replaced.wait()  # then the stream ends as a replaced one does
            return
        await trio.sleep_forever()

    plane = ScriptedPlane(script)
    port = await nursery.start(plane.serve)
    hold = ReconnectHold()
    state = await nursery.start(partial(run_client, options=FAST, hold=hold), ("127.0.0.1", port), NodeInfo("p"),
                                lambda res, v: None)
    await wait_for(lambda: state.version == "v1", what="the first stream")
    hold.hold()
    replaced.set()
    await wait_for(lambda: not state.connected, what="the stream ended")
    await trio.sleep(0.5)  # many back-off delays of FAST
    assert len(plane.hellos) == 1 and not state.connected
    hold.release()  # the handover failed: this process keeps the node
    await wait_for(lambda: state.connected and len(plane.hellos) == 2, what="reconnected once released")
