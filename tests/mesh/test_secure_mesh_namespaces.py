"""The secure namespace mesh (examples/mesh_demo.py --secure): a control plane in its own namespace
issues each sidecar a workload certificate; mesh-wide STRICT mutual TLS; the tutorial's two access
control examples applied with `triomesh apply`, matched on the identities of those certificates; a
real Prometheus scraping the sidecars with Istio's dashboard queries; the three-hop trace in a Zipkin
collector. One mesh serves every test of this module (starting one takes ~10 s)."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import trio

from examples.mesh_demo import (ADMIN_PORT, APP_PORT, CONTROLPLANE_NODE, MESH_APPS, SECURITY_DIR, STRICT_MTLS, MeshDemo,
                                stat_value, version_counts)
from tests.tracing.collector import ZipkinCollector

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace mesh needs root (network namespaces, iptables)"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables-restore", "setpriv", "openssl"))
        and not os.environ.get("CI"),
        reason="needs ip (iproute2), iptables-restore (iptables), setpriv (util-linux) and openssl",
    ),
]

CONTROLPLANE_IP = "198.18.0.16"  # the lab's seventh node (examples/mesh_demo.py CONTROLPLANE_NODE)
ZIPKIN_PORT = 9411
SPLIT_REQUESTS = 100
POLICY_WAIT_S = 15.0
SPIFFE = "spiffe://cluster.local/ns/tutorial/sa/"
ETH_P_ALL = 0x0003  # linux/if_ether.h: every protocol

PERMISSIVE_MESH = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
"""


class Collector:
    """The tests' Zipkin collector (tests/tracing/collector.py) listening in the control plane's node,
    run by its own Trio loop in a thread."""

    def __init__(self, listening: socket.socket) -> None:
        self.zipkin = ZipkinCollector()
        self._listening = listening
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            await self.zipkin.start(nursery, self._listening)
            self._started.set()
            while not self._stop.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    def start(self) -> "Collector":
        self._thread.start()
        assert self._started.wait(10), "the collector did not start"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshDemo, Collector]]:
    log_dir = tmp_path_factory.mktemp("secure-mesh")
    demo = MeshDemo(secure=True, access_log="json", log_dir=log_dir, admin_on_node_address=True,
                    zipkin_address=f"{CONTROLPLANE_IP}:{ZIPKIN_PORT}", trace_sampling_percent=100)
    with demo:
        assert demo.lab is not None and demo.lab.node(CONTROLPLANE_NODE).ipv4 == CONTROLPLANE_IP
        listening = demo.lab.socket(CONTROLPLANE_NODE)
        listening.bind((CONTROLPLANE_IP, ZIPKIN_PORT))
        listening.listen(64)
        collector = Collector(listening).start()
        try:
            yield demo, collector
        finally:
            collector.stop()


def wait_for(check, what: str, timeout_s: float = POLICY_WAIT_S):
    """Poll `check` until it returns something true (a pushed config takes a moment); that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def applied(demo: MeshDemo, path: Path) -> Iterator[None]:
    """`triomesh apply -f path`, deleted again on the way out (a failed check leaves no policy behind
    for the module's next test)."""
    demo.apply(path)
    try:
        yield
    finally:
        demo.delete(path)


def plaintext_answer(demo: MeshDemo, node: str, ip: str) -> tuple[int, str] | None:
    """A plaintext GET from `node` to ip:8080; None when the connection is refused or closed unanswered."""
    try:
        return demo.get(node, ip, APP_PORT, "/")
    except OSError:
        return None


def plaintext_refused(demo: MeshDemo, node: str, ip: str) -> bool:
    """An HTTP/1.1 request in plaintext from `node` straight to ip:8080 gets no answer (closed or reset)."""
    with demo.lab.socket(node) as sock:
        sock.settimeout(5)
        sock.connect((ip, APP_PORT))
        sock.sendall(b"GET / HTTP/1.1\r\nhost: preference:8080\r\n\r\n")
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


@dataclass(frozen=True)
class Segment:
    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes


class LinkCapture:
    """What crosses a node's eth0, read by a packet socket in its namespace (a capture of the link,
    as tcpdump would take it): the TCP segments that carry a payload."""

    def __init__(self, demo: MeshDemo, node: str) -> None:
        self.sock = demo.lab.socket(node, socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("eth0", ETH_P_ALL))

    def segments(self) -> list[Segment]:
        out = []
        self.sock.settimeout(0.5)
        while True:
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                break
            if frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
                continue
            ip = frame[14:]
            tcp = ip[(ip[0] & 0x0F) * 4:]
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                ports = struct.unpack("!HH", tcp[:4])
                out.append(Segment((socket.inet_ntoa(ip[12:16]), ports[0]), (socket.inet_ntoa(ip[16:20]), ports[1]), payload))
        self.sock.close()
        return out


def presented_spiffe_id(demo: MeshDemo, node: str, ip: str) -> str:
    """The URI SAN of the certificate a sidecar presents to a mesh TLS client (`openssl s_client`
    run in `node`'s namespace, Istio's ALPN)."""
    shown = subprocess.run(demo.lab.argv(node, ["openssl", "s_client", "-connect", f"{ip}:{APP_PORT}", "-alpn", "istio",
                                                "-showcerts"]), input=b"", capture_output=True, timeout=30)
    pem = shown.stdout[shown.stdout.index(b"-----BEGIN CERTIFICATE-----"):]
    leaf = pem[:pem.index(b"-----END CERTIFICATE-----")] + b"-----END CERTIFICATE-----\n"
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=leaf,
                          capture_output=True, timeout=10).stdout.decode()
    return text.split("URI:")[1].strip()


def test_strict_mutual_tls_between_sidecars(mesh, tmp_path: Path) -> None:
    demo, _ = mesh
    lab = demo.lab
    preference = lab.node("preference").ipv4

    # the flow, every hop over mutual TLS, with its 80/20 split (5 sigma of a binomial(100, 0.2))
    results = demo.customer_requests(SPLIT_REQUESTS)
    assert [status for status, _ in results] == [200] * SPLIT_REQUESTS, results[:3]
    counts = version_counts(body for _, body in results)
    assert counts["v1"] + counts["v2"] == SPLIT_REQUESTS and 2 <= counts["v2"] <= 40, counts

    # a capture of preference's link: both of its hops carry TLS records only, no HTTP in clear
    capture = LinkCapture(demo, "preference")
    assert [status for status, _ in demo.customer_requests(5)] == [200] * 5
    segments = capture.segments()
    mesh_ips = {lab.node(node).ipv4 for node in MESH_APPS}
    between_sidecars = [s for s in segments if {s.source[0], s.destination[0]} <= mesh_ips and APP_PORT in
                        (s.source[1], s.destination[1])]
    hops = {(s.source[0], s.destination[0]) for s in between_sidecars}
    assert {(lab.node("customer").ipv4, preference), (preference, lab.node("customer").ipv4)} <= hops, hops
    assert any(s.source[0] == preference and s.destination[0] in (lab.node("recommendation-v1").ipv4,
                                                                 lab.node("recommendation-v2").ipv4)
               for s in between_sidecars), hops
    assert sum(s.payload.startswith(b"\x17\x03\x03") for s in between_sidecars) >= 4 * 5  # application data
    assert not any(b"HTTP/1.1" in s.payload or b"recommendation v" in s.payload for s in between_sidecars)

    # each sidecar holds the certificate of its workload's service account, from the control plane's CA
    for node in MESH_APPS:
        identity = demo.config_dump(node)["workload_identity"]
        account = "recommendation" if node.startswith("recommendation") else node
        assert identity["spiffe_id"] == SPIFFE + account, identity
        assert presented_spiffe_id(demo, "client", lab.node(node).ipv4) == SPIFFE + account

    # the server sidecars saw the callers' identities on mutual TLS connections
    preference_stats = demo.stats("preference")
    assert ('connection_security_policy="mutual_tls"' in preference_stats
            and f'source_principal="{SPIFFE}customer"' in preference_stats), preference_stats[:2000]
    for node in ("recommendation-v1", "recommendation-v2"):
        assert f'source_principal="{SPIFFE}preference"' in demo.stats(node)

    # STRICT: a client outside the mesh calling preference's app port in plaintext gets nothing, and
    # one with TLS but no mesh certificate fails the handshake
    assert plaintext_refused(demo, "client", preference)
    no_certificate = subprocess.run(
        lab.argv("client", ["openssl", "s_client", "-connect", f"{preference}:{APP_PORT}", "-alpn", "istio-http/1.1",
                            "-ign_eof"]),
        input=b"GET / HTTP/1.1\r\nhost: preference\r\n\r\n", capture_output=True, timeout=30)
    assert b"200 OK" not in no_certificate.stdout and b"alert certificate required" in no_certificate.stderr

    # PERMISSIVE mesh-wide (the applied resource replaces the file's): the same client is served,
    # and the sidecars still talk mutual TLS to each other
    (tmp_path / "permissive.yaml").write_text(PERMISSIVE_MESH)
    demo.apply(tmp_path / "permissive.yaml")
    try:
        status, body = wait_for(lambda: (answer := plaintext_answer(demo, "client", preference)) and answer[0] == 200
                                and answer, "preference serving plaintext under PERMISSIVE")
        assert body.startswith("preference => recommendation v"), body
        assert demo.customer_requests(1)[0][0] == 200
    finally:  # back to STRICT
        demo.apply(STRICT_MTLS)
    wait_for(lambda: plaintext_refused(demo, "client", preference), "STRICT again")
    assert demo.customer_requests(1)[0][0] == 200


def test_access_control_examples_with_certificate_identities(mesh) -> None:
    demo, _ = mesh
    lab = demo.lab
    preference, recommendation = lab.node("preference").ipv4, "198.18.0.200"
    deny, allow = SECURITY_DIR / "deny-customer.yaml", SECURITY_DIR / "allow-chain.yaml"

    # the deny-list: preference refuses customer's identity with Envoy's 403; customer reports it
    with applied(demo, deny):
        status, body = wait_for(lambda: (answer := demo.customer_requests(1)[0])[0] == 503 and answer,
                                "the deny-list at preference")
        assert body == "customer => Error: 403 - RBAC: access denied\n", body
        assert stat_value(demo.stats("preference"), "triomesh_rbac_denied_total") >= 1
        # the access log (written after the response) names the policy that matched
        wait_for(lambda: "rbac_access_denied_matched_policy[ns[tutorial]-policy[preference-deny-customer]-rule[0]]" in (
            Path(demo.log_dir) / "sidecar-preference.log").read_text(), "the denial in preference's access log", 5)
        # another identity is not on the list: recommendation's sidecar calling preference is served
        status, body = demo.get("recommendation-v1", preference, APP_PORT, "/")
        assert status == 200 and body.startswith("preference => recommendation v"), body
    wait_for(lambda: demo.customer_requests(1)[0][0] == 200, "the flow back after the deny-list is deleted")

    # the allow-list, the tutorial's whitelist: only customer -> preference -> recommendation
    with applied(demo, allow):
        wait_for(lambda: demo.get("customer", recommendation, APP_PORT, "/")[0] == 403, "the allow-list at recommendation")
        assert demo.get("customer", recommendation, APP_PORT, "/") == (403, "RBAC: access denied")
        assert demo.get("recommendation-v1", preference, APP_PORT, "/") == (403, "RBAC: access denied")
        results = demo.customer_requests(20)
        assert [status for status, _ in results] == [200] * 20, results[:3]
        assert all(body.startswith("customer => preference => recommendation v") for _, body in results)
    wait_for(lambda: demo.get("customer", recommendation, APP_PORT, "/")[0] == 200, "the allow-list deleted")


PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL_S = 1
OK_REQUESTS = 40
DENIED_REQUESTS = 10


def query(demo: MeshDemo, promql: str) -> list[dict]:
    """A PromQL instant query to the Prometheus in the control plane's node."""
    status, text = demo.get(CONTROLPLANE_NODE, CONTROLPLANE_IP, PROMETHEUS_PORT,
                            "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    answer = json.loads(text)
    assert status == 200 and answer["status"] == "success", answer
    return answer["data"]["result"]


def by(results: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in results}


def sums_served(demo: MeshDemo, reporter: str, group: str) -> dict[str, float]:
    """sum(istio_requests_total{reporter=`reporter`}) by (`group`), from what the sidecars serve now."""
    sums: dict[str, float] = collections.Counter()
    for node in MESH_APPS:
        for line in demo.stats(node).splitlines():
            if line.startswith("istio_requests_total{") and f'reporter="{reporter}"' in line:
                value = re.search(rf'[{{,]{group}="([^"]*)"', line)
                sums[value.group(1) if value else ""] += float(line.rpartition(" ")[2])
    return dict(sums)


# Istio's dashboards: what servers report, by workload and by service; what clients report, by service
BY_WORKLOAD = ("destination", "destination_workload")
BY_SERVICE = ("destination", "destination_service")
BY_CALLED_SERVICE = ("source", "destination_service")
CUSTOMER, PREFERENCE, RECOMMENDATION = (f"{name}.tutorial.svc.cluster.local"
                                        for name in ("customer", "preference", "recommendation"))


def sums_scraped(demo: MeshDemo, reporter: str, group: str) -> dict[str, float]:
    return by(query(demo, f'sum(istio_requests_total{{reporter="{reporter}"}}) by ({group})'), group)


def test_prometheus_dashboards_on_the_namespace_mesh(mesh) -> None:
    demo, _ = mesh
    lab = demo.lab
    deny = SECURITY_DIR / "deny-customer.yaml"
    # every series the counted traffic touches exists before Prometheus's first scrape, so that its
    # rate() windows see that traffic whole: one denied request (customer 503, preference 403) first
    with applied(demo, deny):
        wait_for(lambda: demo.customer_requests(1)[0][0] == 503, "the deny-list")
    wait_for(lambda: demo.customer_requests(1)[0][0] == 200, "the deny-list deleted")

    assert demo.log_dir is not None
    targets = ", ".join(f"'{lab.node(node).ipv4}:{ADMIN_PORT}'" for node in MESH_APPS)
    (demo.log_dir / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE_INTERVAL_S}s, evaluation_interval: {SCRAPE_INTERVAL_S}s}}\n"
        "scrape_configs:\n- job_name: triomesh\n  metrics_path: /stats/prometheus\n"
        f"  static_configs: [{{targets: [{targets}]}}]\n")
    demo.spawn("prometheus", CONTROLPLANE_NODE, None, [
        "prometheus", f"--config.file={demo.log_dir / 'prometheus.yml'}", f"--storage.tsdb.path={demo.log_dir / 'tsdb'}",
        f"--web.listen-address={CONTROLPLANE_IP}:{PROMETHEUS_PORT}"])

    def up() -> bool:
        try:
            return by(query(demo, "count(up == 1)"), "") == {"": 4.0}
        except (OSError, ValueError):
            return False

    wait_for(up, "Prometheus scraping the four sidecars", timeout_s=30)
    before = {group: sums_served(demo, *group) for group in (BY_WORKLOAD, BY_SERVICE, BY_CALLED_SERVICE)}
    wait_for(lambda: all(sums_scraped(demo, *group) == sums for group, sums in before.items()),
             "Prometheus's first complete scrape")

    # the counted traffic: OK_REQUESTS through the whole chain, then DENIED_REQUESTS refused at
    # preference (customer answers 503), counting the ones sent while the policy was on its way
    statuses = [status for status, _ in demo.customer_requests(OK_REQUESTS)]
    with applied(demo, deny):
        while statuses.count(503) < DENIED_REQUESTS:
            statuses.append(demo.customer_requests(1)[0][0])
            assert len(statuses) < OK_REQUESTS + DENIED_REQUESTS + 100, "the deny-list never applied"
    ok, denied = statuses.count(200), statuses.count(503)
    assert ok + denied == len(statuses)
    sent = {BY_WORKLOAD: {"customer-v1": ok + denied, "preference-v1": ok + denied},
            BY_SERVICE: {CUSTOMER: ok + denied, PREFERENCE: ok + denied, RECOMMENDATION: ok},
            BY_CALLED_SERVICE: {PREFERENCE: ok + denied, RECOMMENDATION: ok}}
    seen: list = []

    def scraped_all() -> bool:
        now = {group: sums_scraped(demo, *group) for group in before}
        seen.append(now)
        changes = {group: {k: v - before[group].get(k, 0) for k, v in sums.items() if v != before[group].get(k, 0)}
                   for group, sums in now.items()}
        workloads = changes[BY_WORKLOAD]
        return (changes[BY_SERVICE] == sent[BY_SERVICE] and changes[BY_CALLED_SERVICE] == sent[BY_CALLED_SERVICE]
                and workloads.pop("recommendation-v1", 0) + workloads.pop("recommendation-v2", 0) == ok
                and workloads == sent[BY_WORKLOAD])

    try:
        wait_for(scraped_all, "Prometheus to scrape every request", timeout_s=15)
    except AssertionError as e:
        raise AssertionError(f"{e}: {seen[-1:]}, before {before}, sent {sent} ({ok} ok)") from e

    # increase() and rate() extrapolate each series by up to half a scrape interval past its first and
    # last samples in the window. When the samples span a few intervals only (Prometheus started just
    # before, and the requests take a second or two), that alone can double a count; scrapes after the
    # traffic make the span long enough that it cannot.
    time.sleep(6 * SCRAPE_INTERVAL_S)
    # Istio's dashboards, over a window that holds all of the counted traffic and nothing before it
    window = "[5m]"
    increase = by(query(demo, f'sum(increase(istio_requests_total{{reporter="destination"}}{window})) by (destination_workload)'),
                  "destination_workload")
    assert set(increase) == {"customer-v1", "preference-v1", "recommendation-v1", "recommendation-v2"}, increase
    # increase() extrapolates each series to the window's edges: at least the exact count, and not twice it
    for workload in ("customer-v1", "preference-v1"):
        assert ok + denied <= increase[workload] < 2 * (ok + denied), (workload, increase)
    assert ok <= increase["recommendation-v1"] + increase["recommendation-v2"] < 2 * ok, increase
    rate = by(query(demo, f'sum(rate(istio_requests_total{{reporter="destination"}}{window})) by (destination_service)'),
              "destination_service")
    # (an earlier test's plaintext call, by address, is a series of an unknown service with no rate)
    assert {service for service, value in rate.items() if value > 0} == {CUSTOMER, PREFERENCE, RECOMMENDATION}, rate
    success = by(query(demo, f'sum(rate(istio_requests_total{{reporter="destination",response_code!~"5.*"}}{window})) '
                             f'by (destination_workload) / sum(rate(istio_requests_total{{reporter="destination"}}{window})) '
                             'by (destination_workload)'), "destination_workload")
    # customer answered 503 to the denied ones; preference's 403 is not a server error; recommendation never failed
    assert abs(success["customer-v1"] - ok / (ok + denied)) < 0.05, (success, ok, denied)
    assert success["preference-v1"] == success["recommendation-v1"] == success["recommendation-v2"] == 1.0, success
    # every request between sidecars was mutual TLS, from the caller's certificate identity
    principals = by(query(demo, f'sum(increase(istio_requests_total{{reporter="destination",'
                                f'connection_security_policy="mutual_tls"}}{window})) by (source_principal)'),
                    "source_principal")
    # (a series of an earlier test's callers may exist, with no increase)
    assert {principal for principal, count in principals.items() if count > 0} == {SPIFFE + "customer",
                                                                               SPIFFE + "preference"}, principals
    assert principals[SPIFFE + "customer"] >= ok + denied and principals[SPIFFE + "preference"] >= ok, principals
    for quantile in (0.5, 0.9, 0.99):
        for reporter, group in (BY_WORKLOAD, BY_SERVICE, BY_CALLED_SERVICE):
            results = by(query(demo, f"histogram_quantile({quantile}, sum(rate(istio_request_duration_milliseconds_bucket"
                                     f'{{reporter="{reporter}"}}{window})) by (le, {group}))'), group)
            results = {key: value for key, value in results.items() if not math.isnan(value)}  # no traffic: NaN
            assert len(results) == {BY_WORKLOAD: 4, BY_SERVICE: 3, BY_CALLED_SERVICE: 2}[reporter, group], results
            assert all(0 < value <= 2500 for value in results.values()), (quantile, group, results)
    # customer's time includes preference's, which includes recommendation's
    p50 = by(query(demo, "histogram_quantile(0.5, sum(rate(istio_request_duration_milliseconds_bucket"
                         f'{{reporter="destination",response_code="200"}}{window})) by (le, destination_app))'),
             "destination_app")
    # (two medians in one bucket are interpolated alike: equal but for the last bits of a float)
    slack = 1e-9
    assert p50["customer"] >= p50["preference"] - slack and p50["preference"] >= p50["recommendation"] - slack, p50


def test_three_hop_trace_in_zipkin(mesh) -> None:
    demo, collector = mesh
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    [(status, body)] = demo.customer_requests(1, {"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert status == 200, body

    def spans() -> list[dict]:
        return [s for s in list(collector.zipkin.spans) if s["traceId"] == trace_id]

    # a SERVER and a CLIENT span for each pass through a sidecar: five passes (the first one's, the
    # root, ends last); then nothing more arrives
    wait_for(lambda: len(spans()) >= 10, "the trace's ten spans at the collector", timeout_s=15)
    time.sleep(0.5)
    trace = spans()
    assert collector.zipkin.violations == []
    by_id = {s["id"]: s for s in trace}
    assert len(by_id) == len(trace)
    chain, span = [], next(s for s in trace if s.get("parentId") == client_span)
    while span is not None:
        chain.append(span)
        children = [s for s in trace if s.get("parentId") == span["id"]]
        assert len(children) <= 1, children
        span = children[0] if children else None
    # the whole trace is one chain: every sidecar's inbound and outbound side gives a SERVER span and a
    # CLIENT span (docs/tracing.md), the apps carrying the context from their inbound to their outbound call
    assert [(s["kind"], s["localEndpoint"]["serviceName"], s["tags"]["upstream_cluster"]) for s in chain] == [
        (kind, f"{app}.tutorial", cluster)
        for app, clusters in (("customer", ("inbound|8080||", "outbound|8080||preference")),
                              ("preference", ("inbound|8080||", f"outbound|8080|{version(body)}|recommendation")),
                              ("recommendation", ("inbound|8080||",)))
        for cluster in clusters for kind in ("SERVER", "CLIENT")], chain
    assert len(chain) == len(trace) == 10
    # each span starts after its parent and ends within the root (1 ms of clock slack). Not "within its
    # parent": on a loaded machine a span was seen ending ~12 ms after its parent (the client span's end
    # is an open point of the tracing; the in-process three-hop test checks strict nesting)
    root_end = chain[0]["timestamp"] + chain[0]["duration"]
    for parent, child in zip(chain, chain[1:]):
        assert child["timestamp"] >= parent["timestamp"] - 1000, (parent, child)
        assert child["timestamp"] + child["duration"] <= root_end + 1000, (chain[0], child)
    assert {s["tags"]["http.status_code"] for s in chain} == {"200"}
    assert len({s["tags"]["guid:x-request-id"] for s in chain}) == 1
    # each sidecar's inbound SERVER span names the caller: the client node, then the calling sidecars
    callers = [s["tags"]["peer.address"] for s in chain if s["kind"] == "SERVER" and s["tags"]["upstream_cluster"].startswith("inbound")]
    assert callers == [demo.lab.node("client").ipv4, demo.lab.node("customer").ipv4, demo.lab.node("preference").ipv4], callers
    print(trace_text(chain))


def version(body: str) -> str:
    found = re.search(r"recommendation (v\d+) from", body)
    assert found, body
    return found.group(1)


def trace_text(chain: list[dict]) -> str:
    """The trace as README shows it: kind, service, span id, start after the first and duration."""
    start = chain[0]["timestamp"]
    return f"trace {chain[0]['traceId']}\n" + "\n".join(
        f"{'  ' * depth}{s['kind']:6} {s['localEndpoint']['serviceName']:24} {s['tags']['upstream_cluster']:34} "
        f"+{(s['timestamp'] - start) / 1000:.1f} ms  {s['duration'] / 1000:.1f} ms"
        for depth, s in enumerate(chain))
