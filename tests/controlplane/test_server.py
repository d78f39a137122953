"""The control plane on real loopback sockets (in-process server, real TCP): pushes, ACK/NACK,
refused changes, broken frames, heartbeats, debounce, registration and expiry, reconnects."""

from __future__ import annotations

from functools import partial

import msgspec
import trio

from controlplane.framed import FramedStream, StreamClosed

from controlplane.store import ConfigStore
from controlplane.wire import (
    Ack,
    ApplyRequest,
    ApplyResult,
    DeleteRequest,
    Error,
    Heartbeat,
    Hello,
    ResourceKey,
    Source,
    StatusReply,
    StatusRequest,
    Welcome,
)
from proxy.xds.client import ClientOptions, NodeInfo, run_client

from cp_fixtures import split, write_mesh
from cp_harness import Compiling, frame, next_snapshot, raw_connect, raw_proxy, start_plane, wait_for

VS_KEY = ResourceKey("VirtualService", "tutorial", "recommendation")
FAST_CLIENT = ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.2, welcome_timeout_s=2.0)


async def request(port: int, message):
    framed = await raw_connect(port)
    try:
        await framed.send(message)
        return await framed.receive()
    finally:
        await framed.aclose()


def _weights(resources) -> list[int]:
    (vs,) = [r for r in resources if r.kind == "VirtualService"]
    return [rd.weight for rd in vs.obj.spec.http[0].route]


async def test_push_ack_and_proxy_status(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    proxy = Compiling({"app": "customer"})
    state = await nursery.start(run_client, ("127.0.0.1", port),
                                NodeInfo("customer-1", namespace="tutorial", labels={"app": "customer"}), proxy)
    await wait_for(lambda: state.version, what="first snapshot applied")
    assert _weights(proxy.resources) == [80, 20]
    clusters = set(proxy.snapshot.clusters)
    assert "outbound|8080|v2|recommendation" in clusters
    reply = await request(port, StatusRequest())
    assert isinstance(reply, StatusReply) and reply.config_version == "1"
    (status,) = reply.proxies
    await wait_for(lambda: plane.proxies["customer-1"].acked_version == state.version, what="ack seen")
    reply = await request(port, StatusRequest())
    (status,) = reply.proxies
    assert (status.node_id, status.namespace, status.connected) == ("customer-1", "tutorial", True)
    assert status.acked_version == status.sent_version == state.version and status.last_nack == ""


async def test_apply_pushes_a_delta_and_the_ack_is_tracked(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    framed, first = await raw_proxy(port, "p1", namespace="tutorial")
    assert len(first.resources) == 7
    await framed.send(Ack(version=first.version, nonce=first.nonce))
    result = await request(port, ApplyRequest(sources=[Source("w.yaml", split(50, 50).encode())]))
    assert result == ApplyResult(ok=True, config_version="2", configured=["VirtualService tutorial/recommendation"])
    snap = await next_snapshot(framed)
    assert not snap.full and snap.base_version == first.version and snap.removed == []
    (changed,) = snap.resources
    doc = msgspec.msgpack.decode(changed.body)
    assert doc["metadata"]["name"] == "recommendation" and doc["spec"]["http"][0]["route"][1]["weight"] == 50
    assert changed.file == "w.yaml" and changed.document == 0
    await framed.send(Ack(version=snap.version, nonce=snap.nonce))
    await wait_for(lambda: plane.proxies["p1"].acked_version == snap.version, what="delta acked")
    # deleting the override brings the file's version back: another delta
    result = await request(port, DeleteRequest(sources=[Source("w.yaml", split(50, 50).encode())]))
    assert result.ok and result.deleted == ["VirtualService tutorial/recommendation"]
    snap2 = await next_snapshot(framed)
    assert snap2.version == first.version and not snap2.full
    await framed.aclose()


async def test_invalid_apply_is_refused_and_nothing_is_pushed(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    framed, first = await raw_proxy(port, "p1")
    await framed.send(Ack(version=first.version, nonce=first.nonce))
    result = await request(port, ApplyRequest(sources=[Source("bad.yaml", split(80, 30).encode())]))
    assert result.ok is False and result.config_version == "1"
    assert result.error == ("bad.yaml: document 0 (VirtualService tutorial/recommendation): $.spec.http[0].route: "
                            "total destination weight 110 != 100")
    assert store.version == "1"
    with trio.move_on_after(0.5):
        while True:
            m = await framed.receive()
            assert isinstance(m, Heartbeat), f"unexpected push after a refused change: {m}"
    assert plane.pushes_total == 1
    await framed.aclose()


CONFLICT = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: tutorial}
spec:
  selector: {gw: "yes"}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: side, namespace: tutorial}
spec:
  workloadSelector: {labels: {side: "yes"}}
  ingress: [{port: {number: 8080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:9000"}]
"""


async def test_a_snapshot_the_proxy_cannot_compile_is_nacked(tmp_path, nursery):
    write_mesh(tmp_path)
    (tmp_path / "conflict.yaml").write_text(CONFLICT)  # valid for each selector on its own
    store = ConfigStore(tmp_path)
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    labels = {"gw": "yes", "side": "yes"}  # ... but this proxy is selected by both
    proxy = Compiling(labels)
    state = await nursery.start(run_client, ("127.0.0.1", port), NodeInfo("both", namespace="tutorial", labels=labels),
                                proxy)
    await wait_for(lambda: plane.proxies["both"].last_nack, what="nack")
    status = plane.proxies["both"]
    assert status.last_nack == (f"{tmp_path}/conflict.yaml: document 1 (Sidecar tutorial/side): "
                                "$.spec.ingress[0].port.number: 0.0.0.0:8080 is already a listener of Gateway tutorial/gw")
    assert status.acked_version == "" and status.last_nack_version == status.sent_version
    assert state.version == "" and proxy.applied == [] and state.nacks == 1
    reply = await request(port, StatusRequest())
    assert reply.proxies[0].last_nack == status.last_nack
    # while this proxy is connected, a change that breaks what it serves is refused... it serves nothing
    # yet, so the fix is what unblocks it: the Sidecar leaves the directory
    (tmp_path / "conflict.yaml").write_text(CONFLICT.split("---")[0])
    await wait_for(lambda: state.version, what="fixed config applied")
    assert state.acks == 1 and proxy.applied == [state.version]
    await wait_for(lambda: plane.proxies["both"].acked_version == state.version, what="ack")


class RefusingPort(Compiling):
    """A proxy that cannot open a listener port (the runner's bind failure, reported as a ConfigError)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def __call__(self, resources, version):
        from proxy.config.compile import compile_resources
        from proxy.config.errors import ConfigError

        snap = compile_resources(resources, version=version)
        for listener in snap.listeners:
            if listener.port == self.port:
                raise ConfigError(f"listener {listener.name}: cannot bind {listener.address}:{listener.port}: "
                                  "address already in use", file="<runner>")
        super().__call__(resources, version)


GATEWAY_8080 = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: tutorial}
spec:
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


async def test_a_nacking_proxy_keeps_its_last_good_snapshot_and_a_connected_class_is_protected(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    proxy = RefusingPort(8080)
    state = await nursery.start(run_client, ("127.0.0.1", port), NodeInfo("p", namespace="tutorial"), proxy)
    await wait_for(lambda: state.version, what="first snapshot")
    good = state.version
    result = await request(port, ApplyRequest(sources=[Source("gw.yaml", GATEWAY_8080.encode())]))
    assert result.ok, result.error
    await wait_for(lambda: plane.proxies["p"].last_nack, what="nack")
    assert plane.proxies["p"].last_nack == "<runner>: listener 0.0.0.0_8080: cannot bind 0.0.0.0:8080: address already in use"
    assert state.version == good and proxy.applied == [good] and plane.proxies["p"].acked_version == good
    # the NACKed version is not resent (heartbeats continue, no push)
    pushes = plane.pushes_total
    await trio.sleep(0.5)
    assert plane.pushes_total == pushes and state.nacks == 1
    # the next good change reaches the NACKing proxy: it ACKs again
    result = await request(port, DeleteRequest(sources=[Source("gw.yaml", GATEWAY_8080.encode())]))
    assert result.ok, result.error
    await wait_for(lambda: plane.proxies["p"].acked_version == state.version == good, what="back to the good version")
    # a proxy selected by two conflicting configs that compiles today is protected from a change that breaks it
    labels = {"gw": "yes", "side": "yes"}
    other = await nursery.start(run_client, ("127.0.0.1", port), NodeInfo("both", namespace="tutorial", labels=labels),
                                Compiling(labels))
    await wait_for(lambda: other.version, what="other synced")
    result = await request(port, ApplyRequest(sources=[Source("conflict.yaml", CONFLICT.encode())]))
    assert not result.ok
    assert result.error.endswith("0.0.0.0:8080 is already a listener of Gateway tutorial/gw "
                                 "(in the config of proxies in namespace tutorial with labels gw=yes,side=yes)")


async def test_broken_frames_close_only_that_stream(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store, max_frame_bytes=4096)
    healthy, first = await raw_proxy(port, "healthy")
    await healthy.send(Ack(version=first.version, nonce=first.nonce))
    cases = [
        (frame(b"\xc1\xc1\xc1"), "MALFORMED"),
        (frame(msgspec.msgpack.encode({"type": "subscribe"})), "UNKNOWN_TYPE"),
        (b"\x00\x01\x00\x00", "FRAME_TOO_LARGE"),  # 65536 > 4096, refused from the header alone
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "FRAME_TOO_LARGE"),
        (frame(msgspec.msgpack.encode(Ack(version="v", nonce="1"))), "UNEXPECTED_MESSAGE"),
        (frame(msgspec.msgpack.encode(Hello(node_id="old", protocol_version=99))), "UNSUPPORTED_VERSION"),
    ]
    for data, code in cases:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(data)
        framed = FramedStream(stream)
        with trio.fail_after(5):
            error = await framed.receive()
            assert isinstance(error, Error) and error.code == code, (data, error)
            try:
                extra = await framed.receive()
                raise AssertionError(f"stream not closed after {code}: {extra}")
            except StreamClosed:
                pass
        await framed.aclose()
    # a broken frame in the middle of a proxy stream closes that stream
    victim, snap = await raw_proxy(port, "victim")
    await victim.send_bytes(frame(b"\xc1"))
    with trio.fail_after(5):
        while True:
            m = await victim.receive()
            if isinstance(m, Error):
                assert m.code == "MALFORMED"
                break
    await wait_for(lambda: plane.proxies["victim"].stream is None, what="victim disconnected")
    # the server and the healthy stream carry on
    assert plane.proxies["healthy"].stream is not None
    result = await request(port, ApplyRequest(sources=[Source("w.yaml", split(60, 40).encode())]))
    assert result.ok
    snap = await next_snapshot(healthy)
    assert not snap.full
    await healthy.aclose()


async def test_a_silent_proxy_is_closed_after_the_heartbeat_timeout(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4)
    framed, _ = await raw_proxy(port, "silent")
    seen = []
    with trio.fail_after(5):
        while True:
            m = await framed.receive()
            seen.append(type(m).__name__)
            if isinstance(m, Error):
                break
    assert m.code == "HEARTBEAT_TIMEOUT" and seen.count("Heartbeat") >= 2  # the server's own heartbeats kept coming
    await wait_for(lambda: plane.proxies["silent"].stream is None, what="closed")


async def test_a_burst_of_applies_becomes_few_pushes(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store, debounce_quiet_s=0.2, debounce_max_s=2.0)
    framed, first = await raw_proxy(port, "p")
    await framed.send(Ack(version=first.version, nonce=first.nonce))
    weights = [(v, 100 - v) for v in range(10, 30)]
    for v1, v2 in weights:  # 20 applies, back to back
        result = await request(port, ApplyRequest(sources=[Source("w.yaml", split(v1, v2).encode())]))
        assert result.ok, result.error
    assert store.version == "21"
    pushes = []
    with trio.move_on_after(1.0):
        while True:
            snap = await next_snapshot(framed)
            pushes.append(snap)
            await framed.send(Ack(version=snap.version, nonce=snap.nonce))
    assert 1 <= len(pushes) <= 2, [p.version for p in pushes]
    doc = msgspec.msgpack.decode(pushes[-1].resources[0].body)
    assert [r["weight"] for r in doc["spec"]["http"][0]["route"]] == [29, 71]  # the last state wins
    assert plane.pushes_total == 1 + len(pushes)
    await framed.aclose()


async def test_registered_workloads_join_endpoints_and_expire_after_the_grace_period(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store, grace_period_s=0.5)
    watcher = Compiling()
    wstate = await nursery.start(run_client, ("127.0.0.1", port), NodeInfo("watcher", namespace="tutorial"), watcher)
    await wait_for(lambda: wstate.version, what="watcher synced")

    def v3_endpoints():
        c = watcher.snapshot.clusters.get("outbound|8080||recommendation")
        return [(e.address, e.port) for e in c.endpoints if e.labels.get("version") == "v3"] if c else []

    assert v3_endpoints() == []
    async with trio.open_nursery() as workload:
        node = NodeInfo("rec-v3", namespace="tutorial", labels={"app": "recommendation", "version": "v3"},
                        address="127.0.0.7", ports={"http": 18085}, register=True)
        workload.start_soon(run_client, ("127.0.0.1", port), node, Compiling(dict(node.labels)))
        await wait_for(lambda: v3_endpoints() == [("127.0.0.7", 18085)], what="registered endpoint pushed")
        workload.cancel_scope.cancel()
    # stop that proxy: it stays an endpoint during the grace period, then leaves
    t0 = trio.current_time()
    await wait_for(lambda: "rec-v3" in plane.proxies and plane.proxies["rec-v3"].stream is None, what="disconnect")
    await wait_for(lambda: v3_endpoints() == [], timeout_s=5, what="endpoint expired")
    assert trio.current_time() - t0 >= 0.4
    assert "rec-v3" not in plane.proxies


async def test_client_reconnects_and_resyncs_after_a_control_plane_restart(tmp_path, nursery):
    write_mesh(tmp_path)
    proxy = Compiling()
    async with trio.open_nursery() as first_plane:
        store = ConfigStore(tmp_path)
        store.load_directory()
        plane, port = await start_plane(first_plane, store)
        state = await nursery.start(partial(run_client, options=FAST_CLIENT), ("127.0.0.1", port), NodeInfo("p"), proxy)
        await wait_for(lambda: state.version, what="synced")
        v1 = state.version
        first_plane.cancel_scope.cancel()  # the control plane goes away: listener and streams close
    await wait_for(lambda: not state.connected, what="client noticed")
    # while it is gone the proxy keeps its last good snapshot, and a change is made meanwhile
    await trio.sleep(0.3)
    assert state.version == v1 and proxy.applied == [v1] and state.connects == 1
    (tmp_path / "routes.yaml").write_text(split(30, 70))
    async with trio.open_nursery() as second_plane:
        store = ConfigStore(tmp_path)
        store.load_directory()
        plane, _ = await start_plane(second_plane, store, port=port)
        await wait_for(lambda: state.version != v1, what="resync after reconnect")
        assert state.connects == 2 and _weights(proxy.resources) == [30, 70]
        await wait_for(lambda: plane.proxies["p"].acked_version == state.version, what="ack after resync")
        second_plane.cancel_scope.cancel()


async def test_a_restarted_proxy_replaces_its_old_stream(tmp_path, nursery):
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    old, first = await raw_proxy(port, "same-node")
    await old.send(Ack(version=first.version, nonce=first.nonce))
    await wait_for(lambda: plane.proxies["same-node"].acked_version, what="ack")
    # the proxy restarts before its old connection is seen as dead: the new stream takes over
    new, snap = await raw_proxy(port, "same-node")
    assert snap.full and snap.version == first.version
    assert plane.proxies["same-node"].acked_version == ""  # a new stream starts unacknowledged
    await new.send(Ack(version=snap.version, nonce=snap.nonce))
    await wait_for(lambda: plane.proxies["same-node"].acked_version == snap.version, what="ack on new stream")
    reply = await request(port, StatusRequest())
    assert [p.node_id for p in reply.proxies] == ["same-node"] and reply.proxies[0].connected
    await new.aclose()
    await old.aclose()


async def test_a_proxy_that_serves_its_view_already_is_sent_nothing_and_gets_deltas_on_it(tmp_path, nursery):
    """A reconnect to a restarted control plane or another replica: the Hello names the version the
    proxy serves; when it is the proxy's view, no snapshot goes out, and the next change is a delta on it."""
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    plane, port = await start_plane(nursery, store)
    framed, first = await raw_proxy(port, "p1", namespace="tutorial")
    await framed.aclose()
    resumed = await raw_connect(port)
    await resumed.send(Hello(node_id="p2", namespace="tutorial", last_version=first.version))
    assert isinstance(await resumed.receive(), Welcome)
    with trio.move_on_after(0.5) as quiet:
        await next_snapshot(resumed, timeout_s=1.0)
    assert quiet.cancelled_caught and plane.proxies["p2"].acked_version == first.version
    result = await request(port, ApplyRequest(sources=[Source("w.yaml", split(50, 50).encode())]))
    assert result.ok
    snap = await next_snapshot(resumed)
    assert not snap.full and snap.base_version == first.version and len(snap.resources) == 1
    # a version the proxy's view does not have: a full snapshot, as for a new proxy
    stale = await raw_connect(port)
    await stale.send(Hello(node_id="p3", namespace="tutorial", last_version=first.version))
    assert isinstance(await stale.receive(), Welcome)
    full = await next_snapshot(stale)
    assert full.full and full.version == snap.version
    await resumed.aclose()
    await stale.aclose()


async def test_a_config_file_is_not_taken_while_its_writer_has_it_open(tmp_path, nursery):
    """The directory is read by the proxy's --config rule (docs/config-reload.md): routes.yaml cut to a
    comment is a valid mesh on its own (no VirtualService), yet is not taken while its writer still
    has the file open; the writer's close brings the complete file in."""
    store = ConfigStore(write_mesh(tmp_path))
    store.load_directory()
    await start_plane(nursery, store, poll_interval_s=0.05)
    async with await trio.open_file(tmp_path / "routes.yaml", "w") as f:
        await f.write("# generated\n")
        await f.flush()
        await trio.sleep(0.8)  # several polls and settle delays: what must not happen has had its chance
        assert store.version == "1" and VS_KEY in store.state
        await f.write(split(30, 70))
    await wait_for(lambda: store.version == "2", what="the complete file taken")
    assert [rd.weight for rd in store.state[VS_KEY].resource.obj.spec.http[0].route] == [30, 70]
