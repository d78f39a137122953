"""Istio's metrics without sockets: the peer header, histograms merged and rendered as Prometheus
reads them, who believes which peer header, the label-set cap."""

from __future__ import annotations

from proxy.l7 import h1
from proxy.l7.body import NO_BODY
from proxy.l7.chain import Chain
from proxy.l7.context import RequestContext
from proxy.l7.dataplane import ClusterRuntime, DataPlane, build_chain
from proxy.l7.events import RequestHead, ResponseHead
from proxy.l7.h2_client import H2Exchange
from proxy.l7.headparser import parse_request_head
from proxy.l7.router import Exchange
from proxy.l7.stages.peer_metadata import PeerMetadataStage
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats, merge, render_prometheus
from proxy.telemetry.istio_metrics import DEFAULT_BUCKETS, IstioMetrics
from proxy.telemetry.peer import PEER_HEADER, UNKNOWN, WorkloadIdentity, identity_from_labels, parse_peer_header
from tests.config.helpers import compile_docs, doc

CLIENT = identity_from_labels("tutorial", {"app": "customer", "version": "v1"}, "customer-v1")


def test_peer_header_round_trip_and_defaults() -> None:
    value = CLIENT.header_value()
    assert value == b"namespace=tutorial;workload=customer-v1;app=customer;version=v1;service=customer;revision=v1;cluster=Kubernetes"
    assert parse_peer_header(value) == CLIENT
    # keys in any order, unknown keys ignored, missing facts unknown
    assert parse_peer_header(b"app=x;future=1;namespace=ns") == WorkloadIdentity(namespace="ns", app="x")
    assert parse_peer_header(b"namespace=ns").principal == UNKNOWN  # never from a header


def test_malformed_peer_headers_are_refused_whole() -> None:
    for bad in (b"", b"app", b"app=", b"app=a b", b'app=x"y', b"app=" + b"a" * 64, b"app=\xff",
                b"app=x;" * 100):
        assert parse_peer_header(bad) is None, bad


def test_histogram_buckets_merge_across_workers_and_render_as_prometheus_reads_them() -> None:
    workers = [Stats(), Stats()]
    labels = (("reporter", "source"),)
    for stats, values in zip(workers, ([0.5, 3.0], [5.0, 7000000.0])):
        h = stats.histogram("istio_request_duration_milliseconds", labels, DEFAULT_BUCKETS)
        for v in values:
            h.observe(v)
    text = render_prometheus(merge(w.export() for w in workers))
    lines = [line for line in text.splitlines() if "istio_request_duration" in line and not line.startswith("# HELP")]
    assert lines[0] == "# TYPE istio_request_duration_milliseconds histogram"
    assert lines[1] == 'istio_request_duration_milliseconds_bucket{reporter="source",le="0.5"} 1'  # le is inclusive
    assert lines[2] == 'istio_request_duration_milliseconds_bucket{reporter="source",le="1"} 1'
    assert lines[3] == 'istio_request_duration_milliseconds_bucket{reporter="source",le="5"} 3'
    assert lines[19] == 'istio_request_duration_milliseconds_bucket{reporter="source",le="3600000"} 3'
    assert lines[20] == 'istio_request_duration_milliseconds_bucket{reporter="source",le="+Inf"} 4'
    assert lines[21] == 'istio_request_duration_milliseconds_sum{reporter="source"} 7000008.5'
    assert lines[22] == 'istio_request_duration_milliseconds_count{reporter="source"} 4'
    assert len(lines) == 23


MESH = [
    doc("ServiceEntry", "preference", {"hosts": ["preference"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                       "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                                       "endpoints": [{"address": "10.0.0.2", "labels": {"app": "preference"}}]},
        namespace="tutorial"),
    doc("ServiceEntry", "external", {"hosts": ["api.example.com"], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                                     "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                                     "endpoints": [{"address": "10.9.9.9"}]}, namespace="tutorial"),
]


def _context(snapshot, listener, headers, *, client_ip: str) -> RequestContext:
    head = RequestHead(b"GET", b"/", b"preference:8080", list(headers))
    return RequestContext(snapshot, listener, f"{client_ip}:40000", head, 0.0, 0.0)


def test_inbound_believes_the_header_only_from_a_mesh_workload_and_never_passes_it_on() -> None:
    snapshot = compile_docs(*MESH)
    metrics = IstioMetrics(Stats(), identity_from_labels("tutorial", {"app": "preference"}, "preference-v1"))
    stage = PeerMetadataStage(metrics, snapshot, inbound=True)
    # no header from a mesh workload: the registry's labels for its address
    ctx = _context(snapshot, None, [], client_ip="10.0.0.2")
    stage.on_request(ctx)
    assert ctx.extra["peer"].identity == WorkloadIdentity(namespace="tutorial", app="preference",
                                                          canonical_service="preference", canonical_revision="latest")
    for client_ip, believed in (("10.0.0.2", True), ("192.0.2.7", False)):
        ctx = _context(snapshot, None, [(b"accept", b"*/*"), (PEER_HEADER, CLIENT.header_value())], client_ip=client_ip)
        stage.on_request(ctx)
        assert ctx.request.headers == [(b"accept", b"*/*")]  # stripped before the app, trusted or not
        peer = ctx.extra["peer"]
        assert peer.identity == (CLIENT if believed else None)
        assert peer.service.service == "preference.tutorial.svc.cluster.local"
        response = ResponseHead(200, [])
        stage.on_response(ctx, response)
        assert response.headers == [(PEER_HEADER, metrics.identity.header_value())]
        assert stage.on_plain_response(ctx, b"server: app\r\n") == (
            b"server: app\r\nx-triomesh-peer: " + metrics.identity.header_value() + b"\r\n")
    # an app behind the client sidecar cannot choose its identity: the sidecar's header comes last
    ctx = _context(snapshot, None, [(PEER_HEADER, b"workload=forged"), (PEER_HEADER, CLIENT.header_value())],
                   client_ip="10.0.0.2")
    stage.on_request(ctx)
    assert ctx.extra["peer"].identity == CLIENT and ctx.request.headers == []


class _Downstream:
    """The parts of a downstream stream (proxy/l7/stream.py) the router reads to build a bodyless
    request's upstream head."""

    relays_plain = False
    grpc = False
    body = NO_BODY
    upstream_framing = h1.FRAMING_NONE

    def __init__(self, chain: Chain) -> None:
        self.chain = chain


async def test_outbound_sends_the_header_to_mesh_services_only_and_strips_the_answer() -> None:
    gateway = [doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                                                  "hosts": ["*"]}]}, namespace="tutorial")]
    for name, host in (("to-preference", "preference"), ("to-external", "api.example.com")):
        gateway.append(doc("VirtualService", name, {"hosts": [host], "gateways": ["gw"],
                                                    "http": [{"route": [{"destination": {"host": host}}]}]},
                           namespace="tutorial"))
    snapshot = compile_docs(*MESH, *gateway)
    plane = DataPlane(SnapshotHolder(snapshot), Stats(), telemetry=IstioMetrics(Stats(), CLIENT))
    runtime = plane.runtime(snapshot)
    [(listener, chain)] = runtime.by_listener.values()
    [stage] = [s for s in chain.response_stages if isinstance(s, PeerMetadataStage)]
    assert not stage.has_request_step  # outbound, the upstream encoders send our header
    for authority, mesh in ((b"preference:8080", True), (b"api.example.com", False)):
        ctx = RequestContext(snapshot, listener, "127.0.0.1:40000",
                             RequestHead(b"GET", b"/", authority, [(PEER_HEADER, b"app=forged")]), 0.0, 0.0)
        for request_stage in chain.request_stages:  # routing and forwarding, as pipeline.serve_request runs them
            assert request_stage.on_request(ctx) is None
        assert ctx.cluster.mesh_internal == mesh
        crt = runtime.clusters[ctx.cluster.name]
        # on the wire ours goes last (the one the server side believes), over HTTP/1.1 and HTTP/2
        # alike, as the router's encoders write the request; a MESH_EXTERNAL service gets only what the
        # app sent
        stream = _Downstream(chain)
        h1_head = Exchange(ctx, plane, crt, stream)._request_head_bytes(crt)
        h2_fields = H2Exchange(ctx, plane, crt, stream)._fields(crt, None)
        for fields in (parse_request_head(h1_head)[4], h2_fields):
            assert [value for name, value in fields if name == PEER_HEADER] == (
                [b"app=forged"] + ([CLIENT.header_value()] if mesh else []))
            assert fields[-1][0] == (PEER_HEADER if mesh else b"x-request-id")
        response = ResponseHead(200, [(PEER_HEADER, b"namespace=tutorial;workload=preference-v1")])
        stage.on_response(ctx, response)
        assert response.headers == []
        believed = ctx.extra.get("peer") if ctx.extra else None
        assert (believed.identity.workload if believed else None) == ("preference-v1" if mesh else None)
        # the same on a plain HTTP/1.1 response: the head parser takes the header out of its field
        # block (tests/l7/test_forward_response.py) and hands the stage its value
        ctx.extra = None
        assert stage.takes_plain_field == PEER_HEADER and not stage.edits_plain_fields
        stage.on_taken_field(ctx, b"workload=preference-v2")
        believed = ctx.extra.get("peer") if ctx.extra else None
        assert (believed.identity.workload if believed else None) == ("preference-v2" if mesh else None)


def test_a_gateway_to_external_services_only_has_no_peer_stage() -> None:
    gateway = [doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                                                  "hosts": ["*"]}]}, namespace="tutorial"),
               doc("VirtualService", "vs", {"hosts": ["*"], "gateways": ["gw"],
                                            "http": [{"route": [{"destination": {"host": "api.example.com"}}]}]},
                   namespace="tutorial")]
    snapshot = compile_docs(*MESH, *gateway)
    [listener] = snapshot.listeners
    clusters = {name: ClusterRuntime(c, Stats()) for name, c in snapshot.clusters.items()}
    chain = build_chain(snapshot, listener, clusters, telemetry=IstioMetrics(Stats(), CLIENT))
    assert not any(isinstance(s, PeerMetadataStage) for s in chain.request_stages + chain.response_stages)
    assert chain.peer_header is None and chain.peer_field == b""


def test_a_gateway_to_mesh_services_sends_its_header_from_the_upstream_encoders() -> None:
    gateway = [doc("Gateway", "gw", {"servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                                                  "hosts": ["*"]}]}, namespace="tutorial"),
               doc("VirtualService", "vs", {"hosts": ["*"], "gateways": ["gw"],
                                            "http": [{"route": [{"destination": {"host": "preference"}}]}]},
                   namespace="tutorial")]
    snapshot = compile_docs(*MESH, *gateway)
    [listener] = snapshot.listeners
    clusters = {name: ClusterRuntime(c, Stats()) for name, c in snapshot.clusters.items()}
    chain = build_chain(snapshot, listener, clusters, telemetry=IstioMetrics(Stats(), CLIENT))
    # the peer stage reads responses only; no call per request
    assert not any(isinstance(s, PeerMetadataStage) for s in chain.request_stages)
    assert any(isinstance(s, PeerMetadataStage) for s in chain.response_stages)
    assert chain.peer_header == (PEER_HEADER, CLIENT.header_value())
    assert chain.peer_field == PEER_HEADER + b": " + CLIENT.header_value() + b"\r\n"


def test_label_sets_are_capped_and_the_overflow_counted() -> None:
    snapshot = compile_docs(*MESH)
    stats = Stats()
    metrics = IstioMetrics(stats, CLIENT, clock=lambda: 1.0, max_series=2)
    for status in (200, 404, 500, 200):
        ctx = _context(snapshot, None, [], client_ip="127.0.0.1")
        ctx.status = status
        metrics.record_request(ctx)
    merged = merge([stats.export()])
    counts = {dict(labels)["response_code"]: value for (kind, name, labels), value in merged.items()
              if name == "istio_requests_total"}
    assert counts == {"200": 2, "404": 1}
    assert merged[("counter", "triomesh_istio_series_overflow_total", (("metric", "istio_requests_total"),))] == 1


def test_inbound_request_from_an_unknown_client_is_reported_with_an_unknown_source() -> None:
    sidecar = doc("Sidecar", "default", {"ingress": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                                                      "bind": "127.0.0.1", "captureMode": "NONE",
                                                      "defaultEndpoint": "127.0.0.1:9080"}]}, namespace="tutorial")
    snapshot = compile_docs(*MESH, sidecar)
    [inbound] = [listener for listener in snapshot.listeners if listener.traffic_direction == "INBOUND"]
    stats = Stats()
    metrics = IstioMetrics(stats, identity_from_labels("tutorial", {"app": "preference"}, "preference-v1"),
                           clock=lambda: 1.0)
    stage = PeerMetadataStage(metrics, snapshot, inbound=True)
    ctx = _context(snapshot, inbound, [], client_ip="192.0.2.7")
    stage.on_request(ctx)
    assert ctx.extra["peer"].identity is None
    ctx.status = 200
    metrics.record_request(ctx)
    [labels] = [dict(labels) for (_, name, labels), _ in merge([stats.export()]).items() if name == "istio_requests_total"]
    assert labels["reporter"] == "destination"
    assert labels["source_workload"] == "unknown" and labels["destination_workload"] == "preference-v1"
    assert labels["destination_service"] == "preference.tutorial.svc.cluster.local"


def test_durations_read_the_trio_run_clock() -> None:
    """In a Trio run the metrics read the run's clock (as RequestContext.start_monotonic is):
    3 ms before now is in le="5", never a bucket of another clock's epoch."""
    import trio

    snapshot = compile_docs(*MESH)
    stats = Stats()
    metrics = IstioMetrics(stats, CLIENT)

    async def requests() -> None:
        for delay_ms, status in ((3.0, 200), (700.0, 201), (2000.0, 202), (-1.0, 203)):
            ctx = _context(snapshot, None, [], client_ip="127.0.0.1")
            ctx.status = status
            ctx.start_monotonic = trio.current_time() - delay_ms / 1000.0
            metrics.record_request(ctx)

    trio.run(requests)
    merged = merge([stats.export()])
    by_bucket = {(dict(labels)["response_code"], dict(labels)["le"]): value for (kind, name, labels), value in merged.items()
                 if name == "istio_request_duration_milliseconds_bucket"}
    assert (by_bucket[("200", "1")], by_bucket[("200", "5")]) == (0, 1)
    assert (by_bucket[("201", "500")], by_bucket[("201", "1000")]) == (0, 1)
    assert (by_bucket[("202", "1000")], by_bucket[("202", "2500")]) == (0, 1)
    assert by_bucket[("203", "0.5")] == 1  # a clock that stepped back: the first bucket, as bisecting says


def test_request_count_is_the_duration_histograms_and_empty_bodies_land_in_the_first_bucket() -> None:
    snapshot = compile_docs(*MESH)
    stats = Stats()
    metrics = IstioMetrics(stats, CLIENT, clock=lambda: 1.0)
    for received in (0, 0, 700):
        ctx = _context(snapshot, None, [], client_ip="127.0.0.1")
        ctx.status, ctx.bytes_received = 200, received
        metrics.record_request(ctx)
    merged = {(name, dict(labels).get("le")): value for (kind, name, labels), value in merge([stats.export()]).items()
              if name.startswith(("istio_requests_total", "istio_request_duration", "istio_request_bytes"))}
    assert merged[("istio_requests_total", None)] == merged[("istio_request_duration_milliseconds_count", None)] == 3
    assert merged[("istio_request_bytes_bucket", "0.5")] == 2
    assert merged[("istio_request_bytes_bucket", "500")] == 2 and merged[("istio_request_bytes_bucket", "1000")] == 3
    assert merged[("istio_request_bytes_sum", None)] == 700


def test_inbound_request_denied_by_authorization_is_reported_with_its_source() -> None:
    # the peer stage runs before authorization: a 403 still names its caller and service, as Istio's do
    sidecar = doc("Sidecar", "default", {"ingress": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                                                      "bind": "127.0.0.1", "captureMode": "NONE",
                                                      "defaultEndpoint": "127.0.0.1:9080"}]}, namespace="tutorial")
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-root", "namespace": "tutorial"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/"]}}]}]}}
    snapshot = compile_docs(*MESH, sidecar, deny, proxy_labels={"app": "preference"}, proxy_namespace="tutorial")
    [inbound] = [listener for listener in snapshot.listeners if listener.traffic_direction == "INBOUND"]
    stats = Stats()
    metrics = IstioMetrics(stats, identity_from_labels("tutorial", {"app": "preference"}, "preference-v1"),
                           clock=lambda: 1.0)
    chain = build_chain(snapshot, inbound, {}, stats, metrics)
    kinds = [type(stage).__name__ for stage in chain.request_stages]
    assert kinds.index("PeerMetadataStage") < kinds.index("AuthorizationStage"), kinds
    ctx = _context(snapshot, inbound, [(PEER_HEADER, CLIENT.header_value())], client_ip="10.0.0.2")
    for stage in chain.request_stages:
        if (answer := stage.on_request(ctx)) is not None:
            break
    assert answer.status == 403
    ctx.status = 403
    metrics.record_request(ctx)
    [labels] = [dict(labels) for (_, name, labels), _ in merge([stats.export()]).items() if name == "istio_requests_total"]
    assert labels["response_code"] == "403" and labels["source_workload"] == "customer-v1"
    assert labels["destination_service"] == "preference.tutorial.svc.cluster.local"
