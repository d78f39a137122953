"""The tutorial mesh for real: one network namespace per app with its own capture rules and sidecar
(examples/mesh_demo.py), traffic from a client namespace. Checks the 80/20 split, header routing, the
REGISTRY_ONLY egress allow-list, that nothing loops, and that teardown leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pyroute2 import netns

from examples.mesh_demo import APP_PORT, MESH_APPS, DemoError, MeshDemo, refused_tcp, stat_value, version_counts
from proxy.l4.capture import iptables
from proxy.l4.capture.lab import LAB_PREFIX, NETNS_ETC

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the namespace mesh needs root (network namespaces, iptables)"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables-restore", "setpriv")) and not os.environ.get("CI"),
        reason="needs ip (iproute2), iptables-restore (iptables) and setpriv (util-linux)",
    ),
]

SPLIT_REQUESTS = 200


def lab_leftovers(run_id: str) -> list[str]:
    prefix = f"{LAB_PREFIX}{run_id}-"
    names = [n for n in netns.listnetns() if n.startswith(prefix)]
    if NETNS_ETC.is_dir():
        names += [str(p) for p in NETNS_ETC.iterdir() if p.name.startswith(prefix)]
    return names


def test_tutorial_mesh_in_namespaces(tmp_path: Path) -> None:
    with MeshDemo(access_log="json", log_dir=tmp_path) as mesh:
        lab = mesh.lab
        assert lab is not None
        run_id = lab.run_id
        for name in MESH_APPS:
            assert any("REDIRECT --to-ports 15001" in line for line in iptables.show(netns=lab.node(name).netns))

        # 80/20 between v1 and v2, decided by preference's sidecar; 5 sigma of a binomial(200, 0.2)
        results = mesh.customer_requests(SPLIT_REQUESTS)
        assert [status for status, _ in results] == [200] * SPLIT_REQUESTS, results[:3]
        assert all(body.startswith("customer => preference => recommendation v") for _, body in results)
        counts = version_counts(body for _, body in results)
        assert counts["v1"] + counts["v2"] == SPLIT_REQUESTS
        assert 12 <= counts["v2"] <= 68, counts

        # header-based routing: the apps propagate end-user, preference's sidecar matches it
        jason = mesh.customer_requests(10, {"end-user": "jason"})
        assert version_counts(body for _, body in jason) == {"v2": 10}

        # egress allow-list: "outside" has no ServiceEntry. It is up (the client, outside the mesh,
        # reaches it), but from inside the mesh HTTP gets 502 and anything else a reset
        outside = lab.node("outside").ipv4
        status, body = mesh.get("client", outside, APP_PORT, "/")
        assert status == 200 and "recommendation outside" in body
        status, body = mesh.get("customer", outside, APP_PORT, "/")
        assert status == 502 and "not in the mesh registry" in body
        assert refused_tcp(mesh, "customer", outside, APP_PORT)

        total = SPLIT_REQUESTS + 10
        customer = mesh.stats("customer")
        assert stat_value(customer, "triomesh_sidecar_outbound_refused_total", protocol="http") == 1
        assert stat_value(customer, "triomesh_sidecar_outbound_refused_total", protocol="tcp") == 1
        # one captured outbound connection per app call (urllib does not reuse them) and not one more:
        # the sidecar's own upstream connections are not captured again
        assert stat_value(customer, "triomesh_sidecar_cx_total", listener="virtualOutbound", action="http") == total
        assert stat_value(customer, "triomesh_upstream_rq_total", cluster="outbound|8080||preference",
                          response_code="200") == total
        assert stat_value(customer, "triomesh_upstream_rq_total", cluster="inbound|8080||", response_code="200") == total
        preference = mesh.stats("preference")
        v1 = stat_value(preference, "triomesh_upstream_rq_total", cluster="outbound|8080|v1|recommendation")
        v2 = stat_value(preference, "triomesh_upstream_rq_total", cluster="outbound|8080|v2|recommendation")
        assert (v1, v2) == (counts["v1"], counts["v2"] + 10)
        for name in ("recommendation-v1", "recommendation-v2"):
            served = stat_value(mesh.stats(name), "triomesh_upstream_rq_total", cluster="inbound|8080||")
            assert served == (v1 if name.endswith("v1") else v2)
        log_dir = mesh.log_dir
    assert lab_leftovers(run_id) == []
    # the sidecars' access logs name the cluster each request went to
    access = (Path(log_dir) / "sidecar-preference.log").read_text()
    assert '"outbound|8080|v2|recommendation"' in access


def test_failed_start_tears_everything_down(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: x}\n"
                                       "spec: {egress: [{hosts: [nonsense]}]}\n")
    mesh = MeshDemo(config_dir=tmp_path, log_dir=tmp_path)
    with pytest.raises(DemoError, match="exited"):
        with mesh:
            pass
    assert mesh.lab is not None
    assert lab_leftovers(mesh.lab.run_id) == []
    assert all(proc.poll() is not None for proc in mesh.procs.values())
