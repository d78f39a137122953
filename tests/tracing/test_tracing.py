"""Tracing through the real data path: proxies on 127.0.0.1 report to our own Zipkin v2 collector
(tests/tracing/collector.py), which checks every span against the Zipkin v2 schema."""

from __future__ import annotations

import socket
from functools import partial

import h11
import trio

from proxy.l7.dataplane import DataPlane
from proxy.l7.server import serve_listener
from proxy.l7.stages.tracing import Tracing
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from proxy.tracing.exporter import export_spans
from proxy.tracing.spans import TracingSettings
from tests.config.helpers import compile_docs
from tests.integration.traffic_harness import LISTENER, Client, TrafficBackend, gateway, service_entry, virtual_service
from tests.tracing.collector import ZipkinCollector

TRACE_HEADERS = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
                 "traceparent", "tracestate", "x-request-id")


MESH_TRACING_100 = {"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
                    "metadata": {"name": "mesh-default", "namespace": "istio-system"},
                    "spec": {"tracing": [{"providers": [{"name": "zipkin"}], "randomSamplingPercentage": 100.0}]}}


async def start_proxy(nursery, collector: ZipkinCollector, host: str, app_port: int, *, sampling: float,
                      service: str, max_queued_spans: int = 4096, export: bool = True,
                      docs: tuple[dict, ...] = ()) -> tuple[int, Tracing]:
    """A proxy routing `host` to the app on `app_port`, its spans to `collector`, `sampling` percent of
    requests sampled unless `docs` hold a Telemetry resource that says otherwise; (its port, its tracing)."""
    app = TrafficBackend(service)
    app.port = app_port
    snapshot = compile_docs(gateway(), service_entry(host, [(app, {})]),
                            virtual_service(service, host, [{"route": [{"destination": {"host": host}}]}]), *docs)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    stats = Stats()
    tracing = Tracing(TracingSettings(collector=("127.0.0.1", collector.port), sampling_percent=sampling,
                                      service_name=f"{service}.default", node_id=f"sidecar~{service}",
                                      max_queued_spans=max_queued_spans, flush_interval_s=0.05), stats)
    plane = DataPlane(SnapshotHolder(snapshot), stats, None, tracing=tracing)
    plane.background = nursery
    await nursery.start(serve_listener, sock, LISTENER, plane)
    if export:
        nursery.start_soon(export_spans, tracing.queue, tracing.settings)
    return port, tracing


class App:
    """A demo-mesh service: answers with its name, after calling `next_hop` (proxy port, host) if any,
    passing the trace headers on as Istio asks applications to. Records the headers it received."""

    def __init__(self, name: str, next_hop: tuple[int, str] | None = None) -> None:
        self.name = name
        self.next_hop = next_hop
        self.port = 0
        self.received: list[dict[str, str]] = []

    async def start(self, nursery) -> App:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    headers = {n.decode(): v.decode() for n, v in event.headers}
                    self.received.append(headers)
                if not isinstance(event, h11.EndOfMessage):
                    continue
                body = self.name.encode()
                if self.next_hop is not None:
                    port, host = self.next_hop
                    client = Client(port, host)
                    reply = await client.request("/", headers=[(n, v) for n, v in headers.items() if n in TRACE_HEADERS])
                    await client.close()
                    body += b" => " + reply.body
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))]))
                                      + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()


def only_schema_valid(collector: ZipkinCollector) -> None:
    assert collector.violations == []


async def test_three_hop_trace_is_reassembled_with_parent_links_and_nested_timings():
    # customer -> preference -> recommendation, each behind its own proxy sampling 1% by default and
    # 100% by the mesh's Telemetry resource
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        recommendation = await App("recommendation").start(nursery)
        recommendation_proxy, _ = await start_proxy(nursery, collector, "recommendation.example.com", recommendation.port,
                                                    sampling=1, service="recommendation", docs=(MESH_TRACING_100,))
        preference = await App("preference", (recommendation_proxy, "recommendation.example.com")).start(nursery)
        preference_proxy, _ = await start_proxy(nursery, collector, "preference.example.com", preference.port,
                                                sampling=1, service="preference", docs=(MESH_TRACING_100,))
        customer = await App("customer", (preference_proxy, "preference.example.com")).start(nursery)
        customer_proxy, _ = await start_proxy(nursery, collector, "customer.example.com", customer.port,
                                              sampling=1, service="customer", docs=(MESH_TRACING_100,))
        client = Client(customer_proxy, "customer.example.com")
        reply = await client.request("/?user=1", headers=[("user-agent", "curl/8")])
        await client.close()
        assert reply.status == 200 and reply.body == b"customer => preference => recommendation"
        spans = await collector.wait_spans(6)
        only_schema_valid(collector)
        nursery.cancel_scope.cancel()
    assert len(spans) == 6 and len({s["traceId"] for s in spans}) == 1
    assert len(spans[0]["traceId"]) == 32
    by_id = {s["id"]: s for s in spans}
    assert len(by_id) == 6
    roots = [s for s in spans if "parentId" not in s]
    assert [(r["kind"], r["localEndpoint"]["serviceName"]) for r in roots] == [("SERVER", "customer.default")]
    # walk down: server -> client -> next proxy's server -> ... six spans in one chain
    chain, span = [], roots[0]
    while span is not None:
        chain.append(span)
        children = [s for s in spans if s.get("parentId") == span["id"]]
        assert len(children) <= 1
        span = children[0] if children else None
    assert [(s["kind"], s["localEndpoint"]["serviceName"]) for s in chain] == [
        ("SERVER", "customer.default"), ("CLIENT", "customer.default"),
        ("SERVER", "preference.default"), ("CLIENT", "preference.default"),
        ("SERVER", "recommendation.default"), ("CLIENT", "recommendation.default")]
    for parent, child in zip(chain, chain[1:]):  # children inside their parents (1 ms of clock slack)
        assert child["timestamp"] >= parent["timestamp"] - 1000
        assert child["timestamp"] + child["duration"] <= parent["timestamp"] + parent["duration"] + 1000
    root = chain[0]
    tags = root["tags"]
    assert tags["http.method"] == "GET"
    assert tags["http.url"] == "http://customer.example.com/?user=1"
    assert tags["http.status_code"] == "200"
    assert tags["component"] == "proxy" and tags["node_id"] == "sidecar~customer"
    assert tags["upstream_cluster"].startswith("outbound|80||customer.example.com")
    assert tags["response_flags"] == "-" and tags["peer.address"] == "127.0.0.1"
    assert tags["user_agent"] == "curl/8" and "error" not in tags
    # the request id is one through the whole trace, the one the apps saw
    assert {s["tags"]["guid:x-request-id"] for s in spans} == {customer.received[0]["x-request-id"]}
    # what the apps received: the client span of the proxy in front of them
    client_span = chain[1]
    assert customer.received[0]["x-b3-spanid"] == client_span["id"]
    assert customer.received[0]["x-b3-parentspanid"] == root["id"]
    assert customer.received[0]["x-b3-sampled"] == "1"
    assert chain[1]["remoteEndpoint"] == {"ipv4": "127.0.0.1", "port": customer.port}


async def test_incoming_unsampled_decision_is_honoured_and_passed_on():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        port, tracing = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=100, service="app")
        client = Client(port, "app.example.com")
        trace_id, span_id = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312"
        for _ in range(5):
            reply = await client.request("/", headers=[("x-b3-traceid", trace_id), ("x-b3-spanid", span_id),
                                                       ("x-b3-sampled", "0")])
            assert reply.status == 200
        await client.close()
        await trio.sleep(0.3)  # six flush intervals
        nursery.cancel_scope.cancel()
    assert collector.spans == [] and collector.posts == 0
    seen = app.received[0]
    assert seen["x-b3-traceid"] == trace_id and seen["x-b3-sampled"] == "0"
    assert seen["x-b3-parentspanid"] == span_id and seen["x-b3-spanid"] != span_id


async def test_client_trace_id_forces_sampling_at_zero_percent_and_error_tag_on_5xx():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        failing = TrafficBackend("failing", status=503)
        await failing.start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", failing.port, sampling=0, service="app")
        client = Client(port, "app.example.com")
        assert (await client.request("/unsampled")).status == 503
        assert (await client.request("/forced", headers=[("x-client-trace-id", "abc")])).status == 503
        await client.close()
        spans = await collector.wait_spans(2)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    only_schema_valid(collector)
    assert len(spans) == 2 and {s["kind"] for s in spans} == {"SERVER", "CLIENT"}
    assert all(s["tags"]["http.url"].endswith("/forced") for s in spans)
    assert all(s["tags"]["error"] == "true" and s["tags"]["http.status_code"] == "503" for s in spans)
    unsampled = [r["headers"] for r in failing.requests if r["target"] == "/unsampled"]
    # a request that brought no context and was not sampled passes only the decision on
    assert unsampled and all(h["x-b3-sampled"] == "0" and "x-b3-traceid" not in h for h in unsampled)
    forced = [r for r in failing.requests if r["target"] == "/forced"]  # with Istio's default retries on 503
    assert forced and all(r["headers"]["x-client-trace-id"] == "abc" and r["headers"]["x-b3-sampled"] == "1"
                          for r in forced)


async def test_w3c_and_b3_single_header_round_trip():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=0, service="app")
        client = Client(port, "app.example.com")
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        await client.request("/w3c", headers=[("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),
                                              ("tracestate", "congo=t61rcWkgMzE")])
        await client.request("/b3", headers=[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")])
        await client.request("/garbage", headers=[("traceparent", "00-zz-b7ad6b7169203331-01"), ("b3", "nonsense"),
                                                  ("x-b3-traceid", "12"), ("x-b3-spanid", "0000000000000000")])
        await client.close()
        spans = await collector.wait_spans(4)
        nursery.cancel_scope.cancel()
    only_schema_valid(collector)
    w3c, b3, garbage = app.received
    # W3C: the sampled flag of traceparent decides (despite 0%); trace id kept, our client span is the parent
    w3c_server = next(s for s in spans if s["kind"] == "SERVER" and s["traceId"] == trace_id)
    w3c_client = next(s for s in spans if s["kind"] == "CLIENT" and s["traceId"] == trace_id)
    assert w3c_server["parentId"] == "b7ad6b7169203331"
    assert w3c["traceparent"] == f"00-{trace_id}-{w3c_client['id']}-01"
    assert w3c["tracestate"] == "congo=t61rcWkgMzE"
    assert w3c["x-b3-traceid"] == trace_id and w3c["x-b3-spanid"] == w3c_client["id"] and "b3" not in w3c
    # B3 single: the same format goes on, with the new span and its parent
    b3_client = next(s for s in spans if s["kind"] == "CLIENT" and s["traceId"] == "80f198ee56343ba864fe8b2a57d3eff7")
    assert b3_client["parentId"] != "e457b5a2e4d86bd1"
    assert b3["b3"] == f"80f198ee56343ba864fe8b2a57d3eff7-{b3_client['id']}-1-{b3_client['parentId']}"
    assert "traceparent" not in b3
    # malformed context: ignored, a new unsampled trace (0%), the request served
    assert garbage["x-b3-sampled"] == "0" and garbage["x-b3-traceid"] != "12" and len(garbage["x-b3-traceid"]) == 32
    assert "traceparent" not in garbage and "b3" not in garbage
    assert len(spans) == 4


async def test_a_full_queue_drops_and_counts_and_requests_are_served():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        # no exporter: nothing empties the queue of 3 spans
        port, tracing = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=100,
                                          service="app", max_queued_spans=3, export=False)
        client = Client(port, "app.example.com")
        for _ in range(4):
            assert (await client.request("/")).status == 200
        await client.close()
        nursery.cancel_scope.cancel()
    assert tracing.queue.dropped.value == 8 - 3
    assert tracing.queue.queued.value == 3


async def test_disable_span_reporting_keeps_propagating_the_decision():
    no_reporting = {**MESH_TRACING_100, "spec": {"tracing": [{"randomSamplingPercentage": 100.0,
                                                               "disableSpanReporting": True}]}}
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=0, service="app",
                                    docs=(no_reporting,))
        client = Client(port, "app.example.com")
        assert (await client.request("/")).status == 200
        await client.close()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert collector.posts == 0 and app.received[0]["x-b3-sampled"] == "1"


async def test_an_unreachable_or_refusing_collector_costs_no_request():
    async with trio.open_nursery() as nursery:
        refusing = await ZipkinCollector(status=500).start(nursery)
        app = await App("app").start(nursery)
        port, tracing = await start_proxy(nursery, refusing, "app.example.com", app.port, sampling=100, service="app")
        client = Client(port, "app.example.com")
        for _ in range(3):
            assert (await client.request("/")).status == 200
        await client.close()
        with trio.fail_after(5):
            while tracing.queue.export_failed.value == 0:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert tracing.queue.sent.value == 0 and refusing.posts >= 1


async def test_a_locally_answered_request_gets_a_server_span_only():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=100, service="app")
        client = Client(port, "unknown.example.com")
        assert (await client.request("/nowhere")).status == 404
        await client.close()
        [span] = await collector.wait_spans(1)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    only_schema_valid(collector)
    assert len(collector.spans) == 1 and span["kind"] == "SERVER" and "parentId" not in span
    assert span["tags"]["response_flags"] == "NR" and span["tags"]["http.status_code"] == "404"
    assert span["tags"]["upstream_cluster"] == "-" and "error" not in span["tags"]
    assert app.received == []


async def test_h2c_requests_from_curl_are_traced_the_same_way():
    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("app").start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=0, service="app")
        done = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-H", "host: app.example.com",
             "-H", "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1", f"http://127.0.0.1:{port}/h2"],
            capture_stdout=True, check=False)
        assert done.returncode == 0 and done.stdout == b"app"
        spans = await collector.wait_spans(2)
        nursery.cancel_scope.cancel()
    only_schema_valid(collector)
    assert {s["tags"]["http.protocol"] for s in spans} == {"HTTP/2"}
    assert {s["traceId"] for s in spans} == {"80f198ee56343ba864fe8b2a57d3eff7"}
    server = next(s for s in spans if s["kind"] == "SERVER")
    assert server["parentId"] == "e457b5a2e4d86bd1" and server["tags"]["user_agent"].startswith("curl/")
    assert app.received[0]["b3"].startswith("80f198ee56343ba864fe8b2a57d3eff7-")


async def test_the_client_span_ends_with_the_upstream_response_not_with_a_slow_downstream():
    # an HTTP/2 client opens a stream window of 1 byte and widens it only after 0.8 s: the upstream
    # answered at once, so the client span is short, while the server span lasts until the last
    # byte reached the client
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    async with trio.open_nursery() as nursery:
        collector = await ZipkinCollector().start(nursery)
        app = await App("a-longer-body").start(nursery)
        port, _ = await start_proxy(nursery, collector, "app.example.com", app.port, sampling=100, service="app")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1})
        conn.send_headers(1, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                              (b":authority", b"app.example.com")], end_stream=True)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(conn.data_to_send())
        body, ended, widened = b"", False, False
        with trio.fail_after(10):
            while not ended:
                with trio.move_on_after(0.8 if not widened else 10) as waited:
                    data = await sock.receive_some(65536)
                if waited.cancelled_caught:  # the window is full: let the rest come
                    conn.increment_flow_control_window(65535, stream_id=1)
                    widened = True
                    await sock.send_all(conn.data_to_send())
                    continue
                assert data, "the proxy closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                await sock.send_all(conn.data_to_send())
        await sock.aclose()
        assert widened and body == b"a-longer-body"
        spans = await collector.wait_spans(2)
        nursery.cancel_scope.cancel()
    only_schema_valid(collector)
    server = next(s for s in spans if s["kind"] == "SERVER")
    client = next(s for s in spans if s["kind"] == "CLIENT")
    assert server["duration"] >= 800_000  # microseconds: the downstream held the response back
    assert client["duration"] < 400_000  # the upstream answered at once
    assert client["timestamp"] + client["duration"] < server["timestamp"] + server["duration"] - 400_000
