"""The config store: last valid state, validation of whole states, apply/delete, registration."""

from __future__ import annotations

import os

import pytest

from controlplane.snapshots import ProxyClass
from controlplane.store import ConfigStore
from controlplane.wire import ResourceKey
from proxy.config.errors import ConfigError

from cp_fixtures import SERVICES, split, write_mesh

VS_KEY = ResourceKey("VirtualService", "tutorial", "recommendation")


def _weights(store: ConfigStore) -> list[int]:
    return [rd.weight for rd in store.state[VS_KEY].resource.obj.spec.http[0].route]


def test_directory_load_and_invalid_change_keeps_the_last_valid_state(tmp_path):
    write_mesh(tmp_path)
    store = ConfigStore(tmp_path)
    assert store.load_directory() is True
    assert store.version == "1" and len(store.state) == 7
    before = dict(store.state)
    (tmp_path / "routes.yaml").write_text(split(70, 20))
    os.utime(tmp_path / "routes.yaml", ns=(1, 1))  # a fingerprint change even within one mtime tick
    assert store.directory_changed()
    with pytest.raises(ConfigError) as e:
        store.load_directory()
    assert str(e.value) == (
        f"{tmp_path}/routes.yaml: document 0 (VirtualService tutorial/recommendation): $.spec.http[0].route: "
        "total destination weight 90 != 100"
    )
    assert store.state == before and store.version == "1"
    assert not store.directory_changed()  # the refused content is not re-read every poll
    (tmp_path / "routes.yaml").write_text(split(50, 50))
    assert store.load_directory() is True
    assert store.version == "2" and _weights(store) == [50, 50]
    # re-reading identical content is not a change
    assert store.load_directory() is False and store.version == "2"


def test_a_dangling_reference_is_refused_with_its_field_path(tmp_path):
    write_mesh(tmp_path)
    store = ConfigStore(tmp_path)
    store.load_directory()
    bad = split(80, 20).replace("subset: v2", "subset: v3")
    with pytest.raises(ConfigError) as e:
        store.apply([("bad.yaml", bad.encode())])
    assert "bad.yaml: document 0 (VirtualService tutorial/recommendation): $.spec.http[0].route[1].destination.subset: " \
           "subset 'v3' is not defined by a DestinationRule" in str(e.value)
    assert _weights(store) == [80, 20] and store.version == "1"


def test_apply_overrides_files_and_delete_brings_the_file_version_back(tmp_path):
    write_mesh(tmp_path)
    store = ConfigStore(tmp_path)
    store.load_directory()
    out = store.apply([("w.yaml", split(10, 90).encode())])
    assert out.configured == ["VirtualService tutorial/recommendation"] and out.changed
    assert _weights(store) == [10, 90] and store.version == "2"
    out = store.apply([("w.yaml", split(10, 90).encode())])
    assert out.unchanged == ["VirtualService tutorial/recommendation"] and not out.changed
    assert store.version == "2"
    out = store.delete([("w.yaml", split(10, 90).encode())])
    assert out.deleted == ["VirtualService tutorial/recommendation"]
    assert _weights(store) == [80, 20] and store.version == "3"
    with pytest.raises(ConfigError, match="defined by the watched directory .*routes.yaml document 0.*remove it there"):
        store.delete([("w.yaml", split(10, 90).encode())])


def test_apply_without_a_directory_and_delete_of_a_missing_resource():
    store = ConfigStore(None)
    with pytest.raises(ConfigError, match=r"subset 'v1' is not defined"):
        store.apply([("all.yaml", (SERVICES + "---" + split(80, 20)).encode())])
    assert store.state == {} and store.version == "0"
    with pytest.raises(ConfigError, match="VirtualService tutorial/recommendation not found"):
        store.delete([("x.yaml", split(80, 20).encode())])
    out = store.apply([("all.yaml", SERVICES.encode())])
    assert len(out.created) == 5 and store.version == "1"


def test_schema_errors_come_from_the_loader(tmp_path):
    store = ConfigStore(None)
    with pytest.raises(ConfigError) as e:
        store.apply([("typo.yaml", split(80, 20).replace("weight", "wieght").encode())])
    assert "typo.yaml: document 0 (VirtualService tutorial/recommendation): $.spec.http[0].route[0].wieght: unknown field `wieght`" == str(e.value)


def test_validation_covers_selector_classes():
    """Two Gateways selecting different workloads may use the same port; a Sidecar ingress that
    collides with a Gateway on the workloads both select is refused, naming the proxy class."""
    gw = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: edge}}
spec:
  selector: {{{sel}}}
  servers: [{{port: {{number: 8080, name: http, protocol: HTTP}}, hosts: ["*"]}}]
"""
    store = ConfigStore(None)
    store.apply([("gw.yaml", (gw.format(name="a", sel="app: a") + "---" + gw.format(name="b", sel="app: b")).encode())])
    sidecar = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: inbound, namespace: edge}
spec:
  workloadSelector: {labels: {app: a}}
  ingress: [{port: {number: 8080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:9000"}]
"""
    with pytest.raises(ConfigError) as e:
        store.apply([("sc.yaml", sidecar.encode())])
    assert "0.0.0.0:8080 is already a listener of Gateway edge/a" in str(e.value)
    assert "in the config of proxies in namespace edge with labels app=a" in str(e.value)
    assert len(store.state) == 2


def test_a_connected_class_that_is_already_broken_does_not_block_changes(tmp_path):
    write_mesh(tmp_path)
    conflicting = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: tutorial}
spec:
  selector: {gw: "yes"}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: side, namespace: tutorial}
spec:
  workloadSelector: {labels: {side: "yes"}}
  ingress: [{port: {number: 8080, protocol: HTTP, name: http}, defaultEndpoint: "127.0.0.1:9000"}]
"""
    (tmp_path / "conflict.yaml").write_text(conflicting)
    both = ProxyClass.of("tutorial", {"gw": "yes", "side": "yes"})
    store = ConfigStore(tmp_path)
    store.load_directory()  # each selector alone compiles; a proxy selected by both cannot
    store.extra_classes = lambda: {both}  # ... and one such proxy is connected (NACKing)
    store.apply([("w.yaml", split(60, 40).encode())])
    assert _weights(store) == [60, 40]
    # a class that compiles today is protected: breaking it is refused
    store.extra_classes = lambda: {ProxyClass.of("tutorial", {"gw": "yes"})}
    sidecar_on_gw = conflicting.split("---")[1].replace('side: "yes"', 'gw: "yes"').replace("name: side", "name: side2")
    with pytest.raises(ConfigError, match="already a listener of Gateway tutorial/gw"):
        store.apply([("s2.yaml", sidecar_on_gw.encode())])


def test_registered_workloads_become_endpoints_and_leave():
    store = ConfigStore(None)
    store.apply([("s.yaml", SERVICES.encode())])
    key = store.register_workload("rec-3", "tutorial", {"app": "recommendation", "version": "v3"}, "127.0.0.9",
                                  {"http": 18085}, "rec-sa")
    assert key == ResourceKey("WorkloadEntry", "tutorial", "rec-3") and store.version == "2"
    assert store.state[key].resource.obj.spec.address == "127.0.0.9"
    with pytest.raises(ConfigError, match=r"\$\.spec\.address"):
        store.register_workload("bad", "tutorial", {"app": "recommendation"}, "not-an-ip", {}, "")
    assert store.unregister_workload(key) is True and key not in store.state and store.version == "3"
    assert store.unregister_workload(key) is False
