"""The merge corpus (tests/config/corpus/merge) through the real data plane, with real backends on
127.0.0.1: subsets merged from three DestinationRules in three files, gateway VirtualServices for one
host merged, and the name `customer` reaching the service of the namespace that says it."""

from __future__ import annotations

import socket
from pathlib import Path

import trio
import yaml

from proxy.config.compile import compile_resources
from proxy.config.load import load_path
from proxy.l7.dataplane import DataPlane
from proxy.l7.server import serve_listener
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats
from tests.integration.traffic_harness import Client, TrafficBackend

CORPUS = Path(__file__).parent.parent / "config" / "corpus" / "merge"
# (namespace, WorkloadEntry name, labels): each gets a backend that answers with that name
WORKLOADS = [
    ("default", "customer-old", {"app": "customer", "version": "old"}),
    ("tutorial", "customer", {"app": "customer", "version": "v1"}),
    ("tutorial", "recommendation-v1", {"app": "recommendation", "version": "v1"}),
    ("tutorial", "recommendation-v2", {"app": "recommendation", "version": "v2"}),
    ("tutorial", "recommendation-v3", {"app": "recommendation", "version": "v3"}),
]


async def _listen(nursery: trio.Nursery, plane: DataPlane, name: str) -> int:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]  # serve_listener owns the socket from here
    await nursery.start(serve_listener, sock, name, plane)
    return port


async def test_merged_subsets_and_per_namespace_names_route_to_the_right_backend(nursery, tmp_path):
    backends = {}
    for _, name, _ in WORKLOADS:
        backends[name] = await TrafficBackend(name).start(nursery)
    entries = [{"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"address": "127.0.0.1", "ports": {"http": backends[name].port}, "labels": labels}}
               for ns, name, labels in WORKLOADS]
    (tmp_path / "workloads.yaml").write_text(yaml.safe_dump_all(entries))
    resources = load_path(CORPUS) + load_path(tmp_path)
    planes = {}
    for namespace in ("tutorial", "default"):  # one proxy per namespace: each gets its namespace's Sidecar
        snap = compile_resources(resources, version="1", bind_address="127.0.0.1", proxy_namespace=namespace)
        planes[namespace] = plane = DataPlane(SnapshotHolder(snap), Stats(), None, None)
        plane.background = nursery
    gateway = Client(await _listen(nursery, planes["tutorial"], "127.0.0.1_8080"))
    from_default = Client(await _listen(nursery, planes["default"], "127.0.0.1_15001"), host="customer")
    from_tutorial = Client(await _listen(nursery, planes["tutorial"], "127.0.0.1_15002"), host="customer")

    # gateway: two VirtualServices for shop.example.com, subsets from three DestinationRules
    expected = {
        "/customer": "customer",  # `customer` in tutorial's VirtualService: tutorial's service
        "/recommendation/v2": "recommendation-v2",  # subset of the second rule
        "/recommendation/v3": "recommendation-v3",  # subset of the third rule
        "/recommendation": "recommendation-v1",  # version-v1 as the first rule defines it
    }
    for path, backend in expected.items():
        for _ in range(3):
            r = await gateway.request(path, host="shop.example.com")
            assert (r.status, r.body) == (200, backend.encode()), path
    r = await gateway.request("/", host="legacy.example.com")  # `customer` in default's VirtualService
    assert (r.status, r.body) == (200, b"customer-old")

    # sidecars: the same name from each namespace reaches that namespace's service
    assert (await from_default.request("/")).body == b"customer-old"
    assert (await from_tutorial.request("/")).body == b"customer"
    assert (await from_default.request("/", host="customer.tutorial:8080")).body == b"customer"
    # two mesh VirtualServices for recommendation: the first (to version-v2) serves
    for client in (from_default, from_tutorial):
        assert (await client.request("/", host="recommendation.tutorial")).body == b"recommendation-v2"
    for client in (gateway, from_default, from_tutorial):
        await client.close()
    assert len(backends["recommendation-v2"].requests) == 3 + 2
    assert len(backends["customer-old"].requests) == 2
