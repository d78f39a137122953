"""Pushed resources turned into runner sources load back into the same resources and Snapshot."""

from __future__ import annotations

from proxy.config.compile import compile_resources
from proxy.config.load import load_bytes, load_path
from proxy.xds.sources import to_sources

REGEX_VS = b"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: tutorial}
spec:
  hosts: [recommendation]
  http:
  - match: [{uri: {regex: "/v[0-9]+/\\\\d+\\\\.json"}, headers: {x-user: {exact: "Zo\xc3\xab"}}}]
    timeout: 250ms
    route: [{destination: {host: recommendation, subset: v1}}]
"""


def test_sources_round_trip(tmp_path):
    resources = load_path("examples/demo") + load_bytes(REGEX_VS, "vs.yaml")
    (name, data), = to_sources(resources, "abc")
    assert name == "<controlplane version abc>"
    back = load_bytes(data, name)
    assert [r.obj for r in back] == [r.obj for r in resources]
    a = compile_resources(resources, version="abc").dump
    b = compile_resources(back, version="abc").dump
    assert a == b
    assert to_sources([], "empty") == [("<controlplane version empty>", b"")]
    assert load_bytes(b"", "x") == []
