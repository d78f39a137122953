"""Plain (not gRPC) responses from an HTTP/2 upstream: a real h2c server written on the `h2` package →
the real proxy → curl over HTTP/1.1 and h2c. Covers the ways a response body is relayed (whole,
streamed past the flow-control windows, without a length, none for HEAD) and the HPACK table of size 0
the upstream connections advertise."""

from __future__ import annotations

import dataclasses

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from proxy.config.snapshot import HeaderOps
from proxy.stats import merge, render_prometheus
from proxy.telemetry.peer import PEER_HEADER, identity_from_labels
from tests.integration.l7_harness import LISTENER, curl, make_snapshot, prefix_route, start_proxy

PEER = identity_from_labels("tutorial", {"app": "preference", "version": "v1"}, "preference-v1")
SMALL = b"s" * 100
BIG = bytes(range(256)) * 1200  # 300 KiB: more than the proxy's 256 KiB stream window


class H2cServer:
    """An h2c (prior knowledge) server: /small and /big with content-length, /nolength without; it
    answers a whole small response in one write, as nginx does, and notes the client's settings."""

    def __init__(self) -> None:
        self.port = 0
        self.header_table_sizes: list[int] = []

    async def start(self, nursery: trio.Nursery) -> H2cServer:
        listeners = await nursery.start(trio.serve_tcp, self._connection, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        send_lock = trio.Lock()

        async def flush() -> None:  # the reader and the responders send on one socket
            async with send_lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        await flush()
        window_opened = trio.Event()
        async with trio.open_nursery() as nursery:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        changed = event.changed_settings.get(h2.settings.SettingCodes.HEADER_TABLE_SIZE)
                        if changed is not None:
                            self.header_table_sizes.append(changed.new_value)
                    elif isinstance(event, h2.events.RequestReceived):
                        fields = dict(event.headers)
                        nursery.start_soon(self._respond, flush, conn, event.stream_id, fields[b":method"],
                                           fields[b":path"], lambda: window_opened)
                    elif isinstance(event, h2.events.WindowUpdated):
                        window_opened.set()
                        window_opened = trio.Event()
                await flush()

    async def _respond(self, flush, conn, stream_id: int, method: bytes, path: bytes, window_event) -> None:
        if path == b"/hang":  # never answers: the proxy's route timeout ends the wait for the head
            return
        body = BIG if path == b"/big" else SMALL
        headers = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"server", b"h2c-test")]
        if path == b"/peer":  # a mesh peer's metadata, twice: the last one is the sidecar's own
            headers += [(PEER_HEADER, b"workload=forged-by-app"), (PEER_HEADER, PEER.header_value())]
        if path != b"/nolength":
            headers.append((b"content-length", b"%d" % len(body)))
        if method == b"HEAD":
            conn.send_headers(stream_id, headers, end_stream=True)
            await flush()
            return
        conn.send_headers(stream_id, headers)
        while body:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                event = window_event()
                await flush()
                await event.wait()
                continue
            piece, body = body[:window], body[window:]
            conn.send_data(stream_id, piece, end_stream=not body)
        await flush()


async def _setup(nursery, timeout_s: float | None = None, mesh_internal: bool = False):
    server = await H2cServer().start(nursery)
    snap = make_snapshot({"h2svc": [server.port]}, [prefix_route(b"/", {"h2svc": 100}, timeout_s=timeout_s)],
                         domains=("*",))
    snap = dataclasses.replace(snap, clusters={name: dataclasses.replace(c, http2=True, mesh_internal=mesh_internal)
                                               for name, c in snap.clusters.items()})
    return server, await start_proxy(nursery, snap)


async def test_plain_responses_from_an_h2c_upstream_over_http1_and_h2c(nursery):
    server, proxy = await _setup(nursery)
    base = f"http://127.0.0.1:{proxy.port}"
    for flags in ([], ["--http2-prior-knowledge"]):
        for _ in range(3):  # the same head again: decoded once, then looked up
            code, out, err = await curl(*flags, "-D", "-", f"{base}/small")
            assert code == 0, err
            head, _, body = out.partition("\r\n\r\n")
            assert body == SMALL.decode() and "content-length: 100" in head.lower(), out
        code, out, err = await curl(*flags, "-o", "/dev/stdout", "-w", "\n%{size_download}", f"{base}/big")
        assert code == 0, err
        assert out.encode("latin-1")[:len(BIG)] == BIG and out.endswith(f"\n{len(BIG)}")
        code, out, err = await curl(*flags, "-D", "-", f"{base}/nolength")
        assert code == 0, err
        assert out.partition("\r\n\r\n")[2] == SMALL.decode()
        code, out, err = await curl(*flags, "-I", f"{base}/small")
        assert code == 0 and "content-length: 100" in out.lower(), (out, err)
    assert server.header_table_sizes == [0]  # one upstream connection, told our HPACK table is 0
    (pool,) = proxy.plane.h2_pools.values()
    assert len(pool) == 1 and pool[0].h2.decoder.table_size == 0


async def test_route_timeout_while_waiting_for_an_h2c_response_head(nursery):
    """With a route timeout the wait for the head runs under a deadline: 504 when none comes, and the
    same pooled connection still serves the next request."""
    _, proxy = await _setup(nursery, timeout_s=0.5)
    base = f"http://127.0.0.1:{proxy.port}"
    for flags in ([], ["--http2-prior-knowledge"]):
        code, out, err = await curl(*flags, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/hang")
        assert (code, out) == (0, "504"), err
        code, out, err = await curl(*flags, "-D", "-", f"{base}/small")
        assert code == 0 and out.partition("\r\n\r\n")[2] == SMALL.decode(), (out, err)
    (pool,) = proxy.plane.h2_pools.values()
    assert len(pool) == 1 and not pool[0].streams  # the timed-out streams were reset and given back


async def test_the_peer_metadata_of_an_h2c_mesh_upstream_is_believed_and_never_passed_on(nursery):
    """Outbound to a mesh-internal HTTP/2 cluster the peer metadata stage is the only response stage:
    the header is taken out of the response's fields (once per repeated header block) and its last
    value names the destination workload in Istio's metrics; the client never sees it."""
    _, proxy = await _setup(nursery, mesh_internal=True)
    chain = proxy.plane.runtime(proxy.plane.holder.current).by_listener[LISTENER][1]
    assert chain.sole_taker is not None and chain.plain_take == PEER_HEADER
    base = f"http://127.0.0.1:{proxy.port}"
    for flags in ([], ["--http2-prior-knowledge"]):
        for _ in range(3):  # the same head again: its fields looked up, the header taken once
            code, out, err = await curl(*flags, "-D", "-", f"{base}/peer")
            assert code == 0, err
            head, _, body = out.partition("\r\n\r\n")
            assert body == SMALL.decode() and "server: h2c-test" in head.lower(), out
            assert PEER_HEADER.decode() not in head.lower(), out
        code, out, err = await curl(*flags, "-D", "-", f"{base}/small")  # no header: nothing believed
        assert code == 0 and PEER_HEADER.decode() not in out.lower(), (out, err)
    text = render_prometheus(merge([proxy.plane.stats.export()]))
    believed = [line for line in text.splitlines()
                if line.startswith("istio_requests_total{") and 'destination_workload="preference-v1"' in line]
    assert len(believed) == 1 and believed[0].endswith(" 6"), text
    assert "forged-by-app" not in text


async def test_response_stages_edit_their_own_copy_of_a_repeated_h2c_response_head(nursery):
    """A repeated upstream header block's fields are shared by its responses: a route's response
    header operations edit a copy each time, and a route without them relays the fields unedited."""
    server = await H2cServer().start(nursery)
    ops = HeaderOps(add=((b"x-added", b"1"),))  # (HeaderOps.apply appends to the list it is given)
    edited = dataclasses.replace(prefix_route(b"/edited", {"h2svc": 100}), response_headers=ops)
    snap = make_snapshot({"h2svc": [server.port]}, [edited, prefix_route(b"/", {"h2svc": 100})])
    snap = dataclasses.replace(snap, clusters={name: dataclasses.replace(c, http2=True)
                                               for name, c in snap.clusters.items()})
    proxy = await start_proxy(nursery, snap)
    base = f"http://127.0.0.1:{proxy.port}"
    for flags in ([], ["--http2-prior-knowledge"]):
        for path in ("/edited", "/small", "/edited", "/small"):  # the same response head each time
            code, out, err = await curl(*flags, "-D", "-", f"{base}{path}")
            assert code == 0, err
            head = out.partition("\r\n\r\n")[0].lower()
            if path == "/edited":
                assert head.count("x-added: 1") == 1 and "server: h2c-test" in head, out
            else:
                assert "x-added" not in head and "server: h2c-test" in head, out
