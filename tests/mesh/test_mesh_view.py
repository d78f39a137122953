"""The control plane's mesh view in a real headless Chromium, on the secure namespace mesh
(examples/mesh_demo.py): known traffic from the client node through customer -> preference ->
recommendation v1/v2, then the page's graph (drawn by its JS from /api/graph, the sidecars' Istio
metrics scraped at their admin addresses) and proxy table checked in the DOM, and a screenshot kept
(copied to $MESH_VIEW_SCREENSHOT when set: that is how docs/mesh-view.png is made)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from examples.mesh_demo import CONTROLPLANE_NODE, MESH_APPS, WORKLOADS, MeshDemo
from tests.mesh.test_secure_mesh_namespaces import wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace mesh needs root (network namespaces, iptables)"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables-restore", "setpriv", "openssl", "chromium"))
        and not os.environ.get("CI"),
        reason="needs ip (iproute2), iptables-restore (iptables), setpriv (util-linux), openssl and chromium",
    ),
]

UI_PORT = 15080
REQUESTS = 30
CHROMIUM_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshDemo]:
    demo = MeshDemo(secure=True, access_log="off", log_dir=tmp_path_factory.mktemp("mesh-view"),
                    admin_on_node_address=True, ui_port=UI_PORT)
    with demo:
        yield demo


class GraphDom(HTMLParser):
    """The SVG groups mesh.js draws (`g.node[data-id]`, `g.edge[data-*]`) and the proxy table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: set[str] = set()
        self.edges: list[dict[str, str]] = []
        self.proxies: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        if tag == "g" and "node" in classes:
            self.nodes.add(attributes["data-id"])
        elif tag == "g" and "edge" in classes:
            self.edges.append(attributes)
        elif tag == "tr" and "proxy" in classes:
            self.proxies.append(attributes["data-node-id"])

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def chromium(mesh: MeshDemo, *args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium in the control plane's node (as root: --no-sandbox), its own profile directory."""
    assert mesh.lab is not None
    url = f"http://{mesh.lab.node(CONTROLPLANE_NODE).ipv4}:{UI_PORT}/"
    command = mesh.lab.argv(CONTROLPLANE_NODE, [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1280,720", "--virtual-time-budget=8000", *args, url])
    done = subprocess.run(command, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done


def test_page_shows_the_graph_of_the_traffic_sent_and_the_proxies(mesh: MeshDemo, tmp_path: Path):
    assert mesh.lab is not None
    ui_ip = mesh.lab.node(CONTROLPLANE_NODE).ipv4

    def graph() -> dict:
        status, text = mesh.get(CONTROLPLANE_NODE, ui_ip, UI_PORT, "/api/graph")
        assert status == 200, text
        return json.loads(text)

    def edge_requests(source: str, destination: str) -> float:
        return sum(edge["requests"] for edge in graph()["edges"]
                   if edge["source"] == f"tutorial/{source}" and edge["destination"] == f"tutorial/{destination}")

    def baselines() -> bool:
        status, text = mesh.get(CONTROLPLANE_NODE, ui_ip, UI_PORT, "/api/proxies")
        return status == 200 and all(proxy["scrapes"] >= 1 for proxy in json.loads(text)["proxies"])

    # a proxy's first scrape is the baseline its later numbers count from: take it before the traffic
    wait_for(baselines, "every sidecar scraped once", timeout_s=20)
    answers = mesh.customer_requests(REQUESTS)
    assert [status for status, _ in answers] == [200] * REQUESTS
    # the view's window holds a scrape from before this traffic and one after it (scrapes every 2 s)
    try:
        wait_for(lambda: edge_requests("customer-v1", "preference-v1") >= REQUESTS,
                 f"{REQUESTS} customer -> preference requests counted in /api/graph", timeout_s=20)
    except AssertionError as e:
        _, proxies = mesh.get(CONTROLPLANE_NODE, ui_ip, UI_PORT, "/api/proxies")
        raise AssertionError(f"{e}\ngraph: {graph()}\nproxies: {proxies}\n{mesh.log_tail('controlplane')}") from e
    wait_for(lambda: edge_requests("preference-v1", "recommendation-v1") + edge_requests("preference-v1", "recommendation-v2")
             >= REQUESTS, "preference -> recommendation v1 + v2 counted", timeout_s=20)

    done = chromium(mesh, "--dump-dom", profile=tmp_path / "profile")
    dom = GraphDom()
    dom.feed(done.stdout.decode())
    workloads = {f"tutorial/{w.node_id}" for w in WORKLOADS.values()}
    assert workloads <= dom.nodes, dom.nodes
    drawn = {(edge["data-source"], edge["data-destination"]): edge for edge in dom.edges}
    for source, destination in (("customer-v1", "preference-v1"), ("preference-v1", "recommendation-v1"),
                                ("preference-v1", "recommendation-v2")):
        edge = drawn[(f"tutorial/{source}", f"tutorial/{destination}")]
        assert float(edge["data-rate"]) > 0, edge
        assert float(edge["data-error-rate"]) == 0, edge
        assert float(edge["data-p99-ms"]) > 0, edge
        assert edge["data-mtls"] == "true", edge  # STRICT mutual TLS between the sidecars
    assert drawn[("tutorial/customer-v1", "tutorial/preference-v1")]["data-service"].startswith("preference")
    # the client node has no sidecar: customer's sidecar reports it as Istio does, `unknown`
    assert ("unknown/unknown", "tutorial/customer-v1") in drawn
    assert any("mTLS" in text for text in dom.texts)
    assert sorted(dom.proxies) == sorted(w.node_id for w in WORKLOADS.values())
    assert len(MESH_APPS) == len(dom.proxies)

    screenshot = tmp_path / "mesh-view.png"
    chromium(mesh, f"--screenshot={screenshot}", profile=tmp_path / "profile")
    image = screenshot.read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000
    if os.environ.get("MESH_VIEW_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["MESH_VIEW_SCREENSHOT"])
