"""The mesh view on loopback (controlplane/meshview.py): an in-process control plane, a proxy on the
real protocol whose admin address serves Istio metrics over real HTTP, the view scraping it; the JSON
API, the static page, and refusals."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import structlog
import trio
from cp_fixtures import write_mesh
from cp_harness import raw_proxy, start_plane, wait_for
from test_meshgraph import series

from controlplane.meshview import MeshView
from controlplane.store import ConfigStore
from controlplane.wire import Ack, Nack
from proxy.runner.admin import open_admin_socket, serve_http

SERVICE = "preference.tutorial.svc.cluster.local"


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


async def test_graph_and_proxies_from_a_scraped_admin_address(tmp_path):
    write_mesh(tmp_path)
    store = ConfigStore(tmp_path)
    store.load_directory()
    exposition = {"text": series("destination", "customer-v1", "preference-v1", SERVICE, ok=10)}

    async def admin(method: bytes, target: bytes):
        assert target == b"/stats/prometheus"
        return 200, b"text/plain; version=0.0.4", exposition["text"].encode()

    async with trio.open_nursery() as nursery:
        plane, port = await start_plane(nursery, store)
        admin_socket = await open_admin_socket("127.0.0.1", 0)
        admin_port = admin_socket.getsockname()[1]
        await nursery.start(serve_http, admin_socket, admin, structlog.get_logger("test.admin"))
        framed, snapshot = await raw_proxy(port, "preference-v1", namespace="tutorial",
                                           admin_address=f"0.0.0.0:{admin_port}", address="127.0.0.1")
        await framed.send(Ack(version=snapshot.version, nonce=snapshot.nonce))
        refusing, refused = await raw_proxy(port, "no-admin", namespace="tutorial")
        await refusing.send(Nack(version=refused.version, nonce=refused.nonce, error="$.spec.hosts: bad host"))
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: that proxy's scrape fails, the others go on
        _unreachable, _ = await raw_proxy(port, "unreachable", namespace="tutorial", admin_address=f"127.0.0.1:{closed_port}")
        view = MeshView(plane.status, plane.server_id, structlog.get_logger("test.meshview"), scrape_interval_s=0.1)
        view_port = await nursery.start(view.serve, "127.0.0.1", 0)
        await wait_for(lambda: plane.proxies["no-admin"].last_nack and plane.proxies["preference-v1"].acked_version,
                       what="the ACK and the NACK")
        await wait_for(lambda: len(view.scraper.window.scrapes.get("preference-v1", ())) >= 1, what="first scrape")
        exposition["text"] = series("destination", "customer-v1", "preference-v1", SERVICE, ok=40, errors=10,
                                    latencies_ms=(3,) * 40)
        await wait_for(lambda: view.graph()["edges"] and view.graph()["edges"][0]["requests"] == 40, what="counted")

        status, content_type, body = await trio.to_thread.run_sync(get, view_port, "/api/graph")
        graph = json.loads(body)
        assert status == 200 and content_type == "application/json"
        assert graph["replica"] == plane.server_id
        assert [node["id"] for node in graph["nodes"]] == ["tutorial/customer-v1", "tutorial/preference-v1"]
        [edge] = graph["edges"]
        assert edge["source"] == "tutorial/customer-v1" and edge["destination"] == "tutorial/preference-v1"
        assert edge["destination_service"] == SERVICE and edge["mtls"] is True
        assert edge["request_rate"] > 0 and edge["error_rate"] == pytest.approx(0.25)
        assert 1 < edge["p99_ms"] <= 5

        status, _, body = await trio.to_thread.run_sync(get, view_port, "/api/proxies")
        proxies = {p["node_id"]: p for p in json.loads(body)["proxies"]}
        assert status == 200 and set(proxies) == {"preference-v1", "no-admin", "unreachable"}
        assert f"127.0.0.1:{closed_port}" in proxies["unreachable"]["scrape_error"]
        assert proxies["unreachable"]["scrapes"] == 0
        assert proxies["preference-v1"]["acked_version"] == snapshot.version
        assert proxies["no-admin"]["last_nack"] == "$.spec.hosts: bad host"
        assert proxies["no-admin"]["last_nack_version"] == refused.version
        assert proxies["preference-v1"]["scrape_error"] == "" and proxies["preference-v1"]["replica"] == plane.server_id
        assert proxies["no-admin"]["admin_address"] == "" and proxies["no-admin"]["scrapes"] == 0
        assert proxies["preference-v1"]["scrapes"] >= 2

        for path, kind in (("/", "text/html"), ("/mesh.js", "text/javascript"), ("/mesh.css", "text/css")):
            status, content_type, body = await trio.to_thread.run_sync(get, view_port, path)
            assert status == 200 and content_type.startswith(kind) and body
        _, _, page = await trio.to_thread.run_sync(get, view_port, "/")
        assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")  # nothing fetched from elsewhere
        assert (await trio.to_thread.run_sync(get, view_port, "/../meshview.py"))[0] == 404
        assert (await trio.to_thread.run_sync(get, view_port, "/api/graph", "POST"))[0] == 405

        # the proxy disconnects: the view drops its numbers
        await framed.aclose()
        await wait_for(lambda: "preference-v1" not in view.scraper.window.scrapes, what="a gone proxy forgotten")
        nursery.cancel_scope.cancel()
