"""Small builders for config tests: YAML documents from Python dicts, compiled snapshots, request heads."""

from __future__ import annotations

from typing import Any

import yaml

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes
from proxy.config.snapshot import Snapshot
from proxy.l7.events import RequestHead

API = "networking.istio.io/v1"


def doc(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None, **meta: Any) -> dict:
    metadata: dict[str, Any] = {"name": name, **meta}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": API, "kind": kind, "metadata": metadata, "spec": spec}


def dump(*docs: dict) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def compile_docs(*docs: dict, bind_address: str = "127.0.0.1", **kw: Any) -> Snapshot:
    return compile_resources(load_bytes(dump(*docs), "test.yaml"), version="t", bind_address=bind_address, **kw)


def service(host: str, port: int = 8080, namespace: str | None = None, name: str | None = None, **spec: Any) -> dict:
    """A STATIC ServiceEntry selecting WorkloadEntries labelled app=<first host label>."""
    body: dict[str, Any] = {
        "hosts": [host],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
        "workloadSelector": {"labels": {"app": host.split(".")[0]}},
    }
    body.update(spec)
    return doc("ServiceEntry", name or host.split(".")[0], body, namespace)


def workload(name: str, app: str, port: int, version: str = "v1", namespace: str | None = None) -> dict:
    return doc(
        "WorkloadEntry",
        name,
        {"address": "127.0.0.1", "ports": {"http": port}, "labels": {"app": app, "version": version}},
        namespace,
    )


def head(
    path: bytes = b"/",
    authority: bytes = b"example.com",
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    scheme: bytes = b"http",
) -> RequestHead:
    return RequestHead(method, path, authority, headers or [], scheme=scheme)


def listener(snapshot: Snapshot, name: str):
    for l in snapshot.listeners:
        if l.name == name:
            return l
    raise AssertionError(f"no listener {name}; have {[l.name for l in snapshot.listeners]}")


def route_for(snapshot: Snapshot, listener_name: str, h: RequestHead):
    vh = listener(snapshot, listener_name).route_table.virtual_host_for(h.authority)
    return None if vh is None else vh.route_for(h)
