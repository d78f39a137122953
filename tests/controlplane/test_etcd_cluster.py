"""Three control-plane replicas on a three-member etcd cluster, all real processes on loopback, with a
real two-worker proxy registered through one of them. The tests run in order on one module-scoped
cluster (starting it is most of their time): a registration reaches every replica; kill -9 of the
proxy's replica under wrk load; kill -9 of the etcd leader; everything killed and restarted. Loads are
bounded (wrk: 8 s); every process is started here and stopped by PID."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from etcd_processes import EtcdCluster, post, wait_until

from tests.runner.harness import Backend, ControlPlane, Proxy, free_port, mesh_config

pytestmark = [
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (Debian etcd-server; `make test` installs it)"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/wrk"), reason="wrk is not installed (make system-deps installs it)"),
]

NODE = "gw-1"
REGISTRATION_KEY = b"/triomesh/controlplane/registrations/test/" + NODE.encode()
APPLIED_KEY = b"/triomesh/controlplane/applied"
GRACE_S = 6  # also the replicas' lease TTL: longer than restarting all three replicas takes on a loaded machine


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.backends = [Backend("v1"), Backend("v2")]
        self.gw_port = free_port()
        self.config = tmp / "config"
        self.config.mkdir()
        (self.config / "mesh.yaml").write_text(mesh_config(self.gw_port, *(b.port for b in self.backends)))
        self.etcd = EtcdCluster(tmp, 3)
        self.replicas: list[ControlPlane] = []
        self.proxy: Proxy | None = None

    def replica(self, i: int, port: int = 0) -> ControlPlane:
        return ControlPlane(self.config, self.tmp, port=port, extra_args=[
            "--data-dir", str(self.tmp / f"cp-data-{i}"), "--store", self.etcd.url, "--grace-period", str(GRACE_S)])

    def versions(self) -> list[str]:
        return [cp.status()["config_version"] for cp in self.replicas if cp.proc.poll() is None]

    def same_version(self) -> str:
        return wait_until(lambda: len(set(v := self.versions())) == 1 and v[0], timeout_s=20,
                          what="one version on every replica")

    def registration(self) -> dict | None:
        """The proxy's registration as etcd holds it (its lease says which replica keeps it)."""
        member = next(m for m in self.etcd.members if m.running())
        kvs = post(member.client_port, "/v3/kv/range", {"key": base64.b64encode(REGISTRATION_KEY).decode()}).get("kvs")
        return kvs[0] if kvs else None

    def served(self) -> tuple[str, list[str]]:
        dump = self.proxy.config_dump()
        return dump["version"], [w["version"] for w in dump["workers"]]

    def reloads(self) -> float:
        return self.proxy.stats("triomesh_config_reloads_total").get((("result", "applied"),), 0.0)

    def stop(self) -> None:
        for p in [self.proxy, *self.replicas]:
            if p is not None:
                p.stop()
        self.etcd.kill()
        for b in self.backends:
            b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("etcd-cluster"))
    try:
        mesh.etcd.start()
        mesh.replicas = [mesh.replica(i).start() for i in range(3)]
        yield mesh
    finally:
        mesh.stop()


def test_a_registration_through_one_replica_is_served_by_every_replica(mesh):
    before = mesh.same_version()
    mesh.proxy = Proxy(None, mesh.tmp, concurrency=2, access_log="off", extra_args=[
        "--controlplane", ",".join(cp.address for cp in mesh.replicas), "--controlplane-plaintext",
        "--node-id", NODE, "--namespace", "test", "--label", "istio=ingressgateway", "--label", "app=edge",
        "--register", "127.0.0.1"]).start()
    registered = wait_until(mesh.registration, what="the registration in etcd")
    assert int(registered.get("lease", 0)) != 0  # on the lease of the replica the proxy is on
    after = mesh.same_version()
    assert after != before
    # the version is the applied layer's revision (none applied yet) and a hash of the content
    assert before.startswith("0-") and after.startswith("0-")


def test_kill_9_of_the_proxy_s_replica_under_wrk_fails_no_request_and_causes_no_reload(mesh):
    proxy = mesh.proxy
    connected_to = proxy.wait_for(lambda: proxy.config_dump()["controlplane"]["connected_to"], "connected")
    victim = next(cp for cp in mesh.replicas if cp.address == connected_to)
    version, reloads_before, lease_before = mesh.served()[0], mesh.reloads(), mesh.registration()["lease"]
    cp_version = mesh.same_version()

    wrk = subprocess.Popen(["wrk", "-t1", "-c8", "-d8s", "--timeout", "5s", f"http://127.0.0.1:{mesh.gw_port}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)
        victim.proc.kill()
        victim.proc.wait(10)
        killed = time.monotonic()
        moved_to = proxy.wait_for(lambda: (c := proxy.config_dump()["controlplane"])["connected"]
                                  and c["connected_to"] != connected_to and c["connected_to"], "moved to another replica")
        moved_s = time.monotonic() - killed
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    assert wrk.returncode == 0, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert int(next(line for line in out.splitlines() if "requests in" in line).split()[0]) > 1000, out
    print(f"proxy on another replica {moved_s:.2f}s after the kill; wrk: "
          + " | ".join(line.strip() for line in out.splitlines() if "requests in" in line or "Latency" in line))
    assert moved_s < 5.0
    assert mesh.served() == (version, [version, version]) and mesh.reloads() == reloads_before
    # the registration moved to the new replica's lease before the dead one's expired (wrk ran past its TTL)
    registered = mesh.registration()
    assert registered is not None and registered["lease"] != lease_before
    assert time.monotonic() - killed > GRACE_S
    survivors = [cp for cp in mesh.replicas if cp is not victim]
    assert moved_to in [cp.address for cp in survivors]
    assert mesh.same_version() == cp_version
    # the killed replica comes back on its port and data directory, for the next tests
    mesh.replicas[mesh.replicas.index(victim)] = mesh.replica(mesh.replicas.index(victim), victim.port).start()
    assert mesh.same_version() == cp_version


def extra_service(name: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: test}}
spec:
  hosts: [{name}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: 18090}}}}]
"""


def test_writes_resume_after_the_etcd_leader_is_killed_and_nothing_applied_is_lost(mesh):
    for name in ("before-kill", "after-kill"):
        (mesh.tmp / f"{name}.yaml").write_text(extra_service(name))
    r = mesh.replicas[0].cli("apply", "-f", str(mesh.tmp / "before-kill.yaml"))
    assert r.returncode == 0, r.stderr
    leader = mesh.etcd.leader()
    leader.kill()
    killed = time.monotonic()
    # the replica's etcd client tries the other members until one serves the write (after the election)
    r = mesh.replicas[1].cli("apply", "-f", str(mesh.tmp / "after-kill.yaml"))
    resumed_s = time.monotonic() - killed
    assert r.returncode == 0, r.stderr
    print(f"an apply succeeded {resumed_s:.2f}s after the etcd leader was killed")
    assert resumed_s < 5.0
    assert mesh.etcd.leader() is not leader
    member = next(m for m in mesh.etcd.members if m.running())
    stored = post(member.client_port, "/v3/kv/range", {"key": base64.b64encode(APPLIED_KEY).decode()})["kvs"][0]
    value = base64.b64decode(stored["value"])
    assert b"before-kill" in value and b"after-kill" in value
    version = mesh.same_version()
    assert version.startswith(f"{stored['mod_revision']}-")
    leader.start(mesh.etcd.initial_cluster)  # back with its data, for the next test
    wait_until(leader.answers, what="the old leader back")


def test_everything_killed_and_restarted_shows_the_same_version_and_the_proxy_does_not_reload(mesh):
    # a settled mesh first: after the earlier tests' kills the proxy's registration can still be
    # moving between leases, and every replica can agree on a version that is about to change
    def settled() -> str | None:
        first = mesh.same_version()
        time.sleep(1)
        return first if mesh.registration() is not None and mesh.same_version() == first else None

    version = wait_until(settled, timeout_s=30, what="one version that stays for a second")
    served, reloads_before = mesh.served(), mesh.reloads()
    for cp in mesh.replicas:
        cp.proc.kill()
        cp.proc.wait(10)
    mesh.etcd.kill()
    mesh.etcd.start()
    mesh.replicas = [mesh.replica(i, cp.port).start() for i, cp in enumerate(mesh.replicas)]
    assert mesh.same_version() == version
    proxy = mesh.proxy
    proxy.wait_for(lambda: proxy.config_dump()["controlplane"]["connected"], "reconnected")
    time.sleep(GRACE_S + 1)  # past the old leases' TTL: the proxy's registration is on a live one
    assert mesh.registration() is not None
    assert mesh.same_version() == version
    assert mesh.served() == served and mesh.reloads() == reloads_before
