"""A compiled Snapshot handed to workers as bytes: decoded in another process it routes every request
as the original does (the closures rebuilt from their recipes), and what cannot be rebuilt is refused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from proxy.config.compile import compile_resources
from proxy.config.istio import HTTPMatchRequest, dec_hook
from proxy.config.load import load_path
from proxy.config.matchers import MatchContext, compile_matches
from proxy.config.snapshot_transfer import SnapshotNotTransferable, decode_snapshot, encode_snapshot, rebuilt_by
from tests.config.helpers import compile_docs, doc, head, service

CORPUS = Path(__file__).parent / "corpus"
REPO = Path(__file__).resolve().parents[2]

DEST = [{"destination": {"host": "a", "port": {"number": 8080}}}]
ROUTES = [
    {"name": "exact", "match": [{"uri": {"exact": "/Exact"}, "ignoreUriCase": True}], "route": DEST},
    {"name": "regex", "match": [{"uri": {"regex": "/r/[0-9]+"}, "method": {"exact": "PUT"}}], "route": DEST},
    {"name": "headers", "match": [{"headers": {"x-user": {"prefix": "jason"}, "x-present": {}},
                                   "withoutHeaders": {"x-debug": {"exact": "1"}}}],
     "route": DEST},
    {"name": "query-or-port", "match": [{"queryParams": {"v": {"exact": "2"}}}, {"port": 9090}],
     "route": DEST},
    {"name": "cors", "match": [{"uri": {"prefix": "/api"}}], "route": DEST,
     "corsPolicy": {"allowOrigins": [{"regex": "https://.*\\.example\\.com"}], "allowMethods": ["GET"]}},
    {"name": "default", "route": DEST},
]

REQUESTS = [
    head(b"/exact", b"a:8080"), head(b"/r/12", b"a:8080", method=b"PUT"), head(b"/r/12", b"a:8080"),
    head(b"/", b"a:8080", headers=[(b"x-user", b"jason-k"), (b"x-present", b"")]),
    head(b"/", b"a:8080", headers=[(b"x-user", b"jason-k"), (b"x-present", b""), (b"x-debug", b"1")]),
    head(b"/?v=2", b"a:8080"), head(b"/", b"a:9090"), head(b"/api/x", b"a:8080"), head(b"/other", b"a:8080"),
]
ORIGINS = [b"https://shop.example.com", b"https://example.org", b""]

# decodes the snapshot on stdin and prints, per request, the route it takes (and CORS answers)
DECODE_ELSEWHERE = """
import sys
from proxy.config.snapshot_transfer import decode_snapshot
from tests.config.test_snapshot_transfer import decisions
print(repr(decisions(decode_snapshot(sys.stdin.buffer.read()))))
"""


def mesh_snapshot():
    return compile_docs(service("a", ports=[{"number": 8080, "name": "http", "protocol": "HTTP"},
                                                  {"number": 9090, "name": "http-alt", "protocol": "HTTP"}]),
                        doc("VirtualService", "a", {"hosts": ["a"], "http": ROUTES}),
                        doc("Sidecar", "default", {"egress": [{"port": {"number": 15001, "protocol": "HTTP", "name": "http"},
                                                               "hosts": ["*/*"]}]}),
                        proxy_labels={"app": "client"})


def decisions(snapshot) -> list:
    out = []
    for listener in snapshot.listeners:
        if listener.route_table is None:
            continue
        for request in REQUESTS:
            vhost = listener.route_table.virtual_host_for(request.authority)
            route = vhost.route_for(request) if vhost is not None else None
            name = route.name if route is not None else None
            cors = [route.cors.origin_allowed(o) for o in ORIGINS] if route is not None and route.cors else []
            out.append((listener.name, request.path, request.authority, name, cors))
    return out


def test_a_decoded_snapshot_in_another_process_routes_as_the_original():
    snapshot = mesh_snapshot()
    expected = decisions(snapshot)
    # the table exercises every kind of match: a decision that differed would show
    assert {d[3] for d in expected} >= {"exact", "regex", "headers", "query-or-port", "cors", "default"}
    assert any(d[4] == [True, False, False] for d in expected)
    out = subprocess.run([sys.executable, "-c", DECODE_ELSEWHERE], input=encode_snapshot(snapshot), capture_output=True,
                         check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout
    assert out.decode().strip() == repr(expected)


def test_a_port_checked_against_the_authority_is_rebuilt():
    # on a listener without a fixed port (MatchContext port None) a block's port is a per-request check
    block = msgspec.convert({"port": 9090, "uri": {"prefix": "/p"}}, HTTPMatchRequest, dec_hook=dec_hook)
    predicate = compile_matches([block], MatchContext("mesh", None, None), lambda g: g)
    back = decode_snapshot(encode_snapshot(dataclasses.replace(mesh_snapshot(), dump={"m": predicate}))).dump["m"]
    for request in (head(b"/p", b"a:9090"), head(b"/p", b"a:8080"), head(b"/q", b"a:9090")):
        assert back(request) == predicate(request)
    assert back(head(b"/p", b"a:9090")) and not back(head(b"/p", b"a:8080"))


def test_decoded_snapshot_keeps_the_dump_and_the_clusters():
    snapshot = mesh_snapshot()
    back = decode_snapshot(encode_snapshot(snapshot))
    assert back.version == snapshot.version
    assert back.dump == snapshot.dump
    assert back.clusters == snapshot.clusters


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_corpus_file_round_trips(path: Path):
    snapshot = compile_resources(load_path(path), version="corpus", bind_address="127.0.0.1")
    assert decode_snapshot(encode_snapshot(snapshot)).dump == snapshot.dump


def test_a_closure_without_a_recipe_is_refused_by_name():
    snapshot = mesh_snapshot()
    secret = 7
    untagged = lambda head: secret == 7  # noqa: E731
    with pytest.raises(SnapshotNotTransferable, match="has no rebuild recipe"):
        encode_snapshot(dataclasses.replace(snapshot, dump={"x": untagged}))
    tagged = rebuilt_by(untagged, int, "7")
    assert decode_snapshot(encode_snapshot(dataclasses.replace(snapshot, dump={"x": tagged}))).dump["x"] == 7
