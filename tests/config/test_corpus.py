"""Resources as users keep them (tests/config/corpus/): exported from a cluster with server fields, a
kubectl List, explicit plaintext (tls DISABLE), fields deprecated since Istio 1.x. Each file loads and
compiles alone, the directory compiles as one config, and each means what Istio says it means."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from controlplane.wire import encode_istio
from proxy.config.compile import compile_resources
from proxy.config.istio import SERVER_MANAGED_METADATA
from proxy.config.load import load_bytes, load_path
from proxy.config.snapshot import Snapshot

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(CORPUS.glob("*.yaml"))


def _compile(path: Path) -> Snapshot:
    return compile_resources(load_path(path), version="corpus", bind_address="127.0.0.1")


def _routes(snap: Snapshot, port: int, authority: bytes) -> list:
    (listener,) = [ln for ln in snap.listeners if ln.port == port]
    return list(listener.route_table.virtual_host_for(authority).routes)


def test_corpus_is_there():
    assert {f.name for f in FILES} >= {"exported-reviews.yaml", "kubectl-list.yaml", "tls-disable.yaml",
                                       "deprecated-fields.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_each_file_loads_and_compiles(path: Path):
    snap = _compile(path)
    assert snap.clusters


def test_whole_corpus_compiles_as_one_config():
    resources = load_path(CORPUS)
    assert len(resources) == 14
    snap = compile_resources(resources, version="corpus", bind_address="127.0.0.1")
    assert {(ln.address, ln.port) for ln in snap.listeners} >= {("127.0.0.1", 8080), ("127.0.0.1", 8081), ("127.0.0.1", 8082)}


def test_exported_resources_keep_what_their_author_wrote_and_drop_the_rest():
    resources = load_path(CORPUS / "exported-reviews.yaml")
    assert [r.key for r in resources] == [("Gateway", "bookinfo", "bookinfo-gateway"), ("ServiceEntry", "bookinfo", "reviews"),
                                          ("DestinationRule", "bookinfo", "reviews"), ("VirtualService", "bookinfo", "reviews")]
    vs = resources[3].obj
    assert vs.metadata.labels == {"team": "storefront"}
    dr = resources[2].obj
    assert "kubectl.kubernetes.io/last-applied-configuration" in dr.metadata.annotations  # just an annotation
    for r in resources:
        encoded = msgspec.msgpack.decode(encode_istio(r.obj))  # what a control plane pushes on
        assert "status" not in encoded
        assert not SERVER_MANAGED_METADATA.intersection(encoded["metadata"]), encoded["metadata"]


def test_exported_virtual_service_routes_as_written():
    routes = _routes(_compile(CORPUS / "exported-reviews.yaml"), 8080, b"reviews")
    jason, split = routes
    assert [d.cluster for d in jason.destinations] == ["outbound|9080|v2|reviews"]
    assert [(d.cluster, d.weight) for d in split.destinations] == [("outbound|9080|v1|reviews", 75),
                                                                   ("outbound|9080|v3|reviews", 25)]


def test_kubectl_list_loads_its_items_with_the_lists_document_index():
    resources = load_path(CORPUS / "kubectl-list.yaml")
    assert [(r.kind, r.name, r.document) for r in resources] == [
        ("Gateway", "shop-gateway", 0), ("ServiceEntry", "cart", 0), ("DestinationRule", "cart", 0),
        ("VirtualService", "cart", 0)]
    (route,) = _routes(_compile(CORPUS / "kubectl-list.yaml"), 8081, b"shop.example.com")
    assert [(d.cluster, d.weight) for d in route.destinations] == [("outbound|8000|stable|cart", 90),
                                                                   ("outbound|8000|canary|cart", 10)]


def test_tls_disable_is_plaintext_exactly_as_without_tls():
    text = (CORPUS / "tls-disable.yaml").read_text()
    without = "\n".join(line for line in text.splitlines()
                        if "tls" not in line and "mode: DISABLE" not in line)
    assert "DISABLE" not in without
    with_tls = compile_resources(load_bytes(text, "tls.yaml"), version="v")
    plain = compile_resources(load_bytes(without, "plain.yaml"), version="v")
    assert with_tls.clusters == plain.clusters
    assert with_tls.clusters["outbound|8080|blue|ledger.payments.svc.cluster.local"].lb_policy == "LEAST_REQUEST"


def test_deprecated_fields_mean_what_istio_made_them_mean():
    snap = _compile(CORPUS / "deprecated-fields.yaml")
    (route,) = _routes(snap, 8082, b"ratings.legacy.svc.cluster.local")
    assert (route.fault.delay_ppm, route.fault.abort_ppm, route.fault.abort_status) == (100_000, 50_000, 503)
    host = "ratings.legacy.svc.cluster.local"
    port_level = snap.clusters[f"outbound|9080||{host}"].outlier
    assert (port_level.consecutive_5xx, port_level.consecutive_gateway) == (0, 3)  # gateway errors only
    subset = snap.clusters[f"outbound|9080|v1|{host}"].outlier
    assert (subset.consecutive_5xx, subset.consecutive_gateway) == (4, 2)  # consecutive5xxErrors re-enables 5xx

