"""The secure namespace mesh (examples/mesh_demo.py --secure): a control plane in its own namespace
issues each sidecar a workload certificate; mesh-wide STRICT mutual TLS; the tutorial's two access
control examples applied with `triomesh apply`, matched on the identities of those certificates; a
real Prometheus scraping the sidecars with Istio's dashboard queries; the three-hop trace in a Zipkin
collector. One mesh serves every test of this module (starting one takes ~10 s)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import trio

from examples.mesh_demo import (APP_PORT, CONTROLPLANE_NODE, MESH_APPS, SECURITY_DIR, STRICT_MTLS, MeshDemo,
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
    status, body = wait_for(lambda: (answer := demo.get("client", preference, APP_PORT, "/"))[0] == 200 and answer,
                            "preference serving plaintext under PERMISSIVE")
    assert body.startswith("preference => recommendation v"), body
    assert demo.customer_requests(1)[0][0] == 200
    # back to STRICT
    demo.apply(STRICT_MTLS)
    wait_for(lambda: plaintext_refused(demo, "client", preference), "STRICT again")
    assert demo.customer_requests(1)[0][0] == 200


def test_access_control_examples_with_certificate_identities(mesh) -> None:
    demo, _ = mesh
    lab = demo.lab
    preference, recommendation = lab.node("preference").ipv4, "198.18.0.200"
    deny, allow = SECURITY_DIR / "deny-customer.yaml", SECURITY_DIR / "allow-chain.yaml"

    # the deny-list: preference refuses customer's identity with Envoy's 403; customer reports it
    demo.apply(deny)
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
    demo.delete(deny)
    wait_for(lambda: demo.customer_requests(1)[0][0] == 200, "the flow back after the deny-list is deleted")

    # the allow-list, the tutorial's whitelist: only customer -> preference -> recommendation
    demo.apply(allow)
    wait_for(lambda: demo.get("customer", recommendation, APP_PORT, "/")[0] == 403, "the allow-list at recommendation")
    assert demo.get("customer", recommendation, APP_PORT, "/") == (403, "RBAC: access denied")
    assert demo.get("recommendation-v1", preference, APP_PORT, "/") == (403, "RBAC: access denied")
    results = demo.customer_requests(20)
    assert [status for status, _ in results] == [200] * 20, results[:3]
    assert all(body.startswith("customer => preference => recommendation v") for _, body in results)
    demo.delete(allow)
    wait_for(lambda: demo.get("customer", recommendation, APP_PORT, "/")[0] == 200, "the allow-list deleted")
