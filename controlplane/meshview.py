"""The control plane's mesh view: an HTTP listener (`triomesh controlplane --ui-address`) serving a
static page shipped in the package (controlplane/meshview_static/), `/api/graph` (the service graph
from the proxies' Istio metrics, controlplane/meshgraph.py) and `/api/proxies` (proxy-status)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from controlplane.meshgraph import TelemetryWindow
from controlplane.scraper import Scraper
from controlplane.wire import StatusReply
from proxy.runner.admin import Reply, open_admin_socket, serve_http

STATIC_DIR = Path(__file__).with_name("meshview_static")
STATIC_FILES = {  # path -> (file, content type); nothing else is served from disk
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/index.html": ("index.html", b"text/html; charset=utf-8"),
    b"/mesh.js": ("mesh.js", b"text/javascript; charset=utf-8"),
    b"/mesh.css": ("mesh.css", b"text/css; charset=utf-8"),
}
_json = msgspec.json.Encoder()


class MeshView:
    """`status()` is the control plane's proxy-status; `server_id` names this replica."""

    def __init__(self, status: Callable[[], StatusReply], server_id: str, log: Any,
                 scrape_interval_s: float = 2.0, window_s: float = 30.0) -> None:
        self.status = status
        self.server_id = server_id
        self.log = log
        self.scraper = Scraper(self._targets, log, TelemetryWindow(window_s), scrape_interval_s)
        self._static = {path: (STATIC_DIR / name).read_bytes() for path, (name, _) in STATIC_FILES.items()}

    def _targets(self) -> list[tuple[str, str, str]]:
        return [(p.node_id, p.admin_address, p.address) for p in self.status().proxies
                if p.connected and p.admin_address]

    def graph(self) -> dict[str, Any]:
        graph = self.scraper.window.graph()
        return {"replica": self.server_id, "window_s": graph.window_s,
                "nodes": [dataclasses.asdict(n) for n in graph.nodes],
                "edges": [dataclasses.asdict(e) for e in graph.edges]}

    def proxies(self) -> dict[str, Any]:
        reply = self.status()
        return {"replica": self.server_id, "config_version": reply.config_version, "proxies": [
            {"node_id": p.node_id, "namespace": p.namespace, "connected": p.connected, "replica": self.server_id,
             "sent_version": p.sent_version, "acked_version": p.acked_version,
             "last_nack": p.last_nack, "last_nack_version": p.last_nack_version,
             "identity": p.identity, "admin_address": p.admin_address,
             "scrape_error": self.scraper.last_error.get(p.node_id, ""),
             "scrapes": len(self.scraper.window.scrapes.get(p.node_id, ()))}
            for p in reply.proxies]}

    async def respond(self, method: bytes, target: bytes) -> Reply:
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain", b"method not allowed: the mesh view is read-only\n"
        path = target.partition(b"?")[0]
        if path == b"/api/graph":
            return 200, b"application/json", _json.encode(self.graph())
        if path == b"/api/proxies":
            return 200, b"application/json", _json.encode(self.proxies())
        if path in STATIC_FILES:
            return 200, STATIC_FILES[path][1], self._static[path]
        return 404, b"text/plain", b"not found\n"

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = await open_admin_socket(host, port)
        bound = sock.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.scraper.run)
            await nursery.start(serve_http, sock, self.respond, self.log)
            self.log.info("mesh_view_listening", address=f"{host}:{bound}")
            task_status.started(bound)
