"""A control plane killed with SIGKILL under data-plane load, all real processes: restarted on its data
directory, or replaced by a second replica. The proxy keeps serving, resyncs without a reload (the
version it serves and its reload counter stay), and no request fails. Loads are bounded in count and
time; every process is started here and stopped by PID."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.runner.harness import Backend, ControlPlane, Proxy, free_port, get, keepalive_load, mesh_config

NODE = "gw-1"


@pytest.fixture
def backends():
    v1, v2 = Backend("v1"), Backend("v2")
    yield v1, v2
    v1.close()
    v2.close()


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


def start_proxy(procs: list, tmp_path: Path, controlplane: str) -> Proxy:
    proxy = Proxy(None, tmp_path, concurrency=2, access_log="off",
                  extra_args=["--controlplane", controlplane, "--controlplane-plaintext", "--node-id", NODE,
                              "--namespace", "test", "--label", "istio=ingressgateway", "--label", "app=edge"])
    procs.append(proxy)
    return proxy.start()


def control_plane(procs: list, tmp_path: Path, config: Path, data: Path, port: int = 0) -> ControlPlane:
    cp = ControlPlane(config, tmp_path, port=port, extra_args=["--data-dir", str(data)]).start()
    procs.append(cp)
    return cp


def sigkill(cp: ControlPlane) -> None:
    assert cp.proc is not None
    cp.proc.kill()
    cp.proc.wait(10)


def reloads(proxy: Proxy) -> float:
    return proxy.stats("triomesh_config_reloads_total").get((("result", "applied"),), 0.0)


def served(proxy: Proxy) -> tuple[str, list[str]]:
    dump = proxy.config_dump()
    return dump["version"], [w["version"] for w in dump["workers"]]


class Load:
    """Keep-alive GETs through the proxy in a thread until stopped (at most 20 s, 50,000 requests)."""

    def __init__(self, port: int) -> None:
        self.stop = threading.Event()
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(port,))
        self.thread.start()

    def _run(self, port: int) -> None:
        self.result = keepalive_load(port, "/", connections=4, total=50_000, max_s=20.0, stop=self.stop)

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        return self.result


def test_a_control_plane_killed_and_restarted_keeps_applies_and_the_proxy_does_not_reload(tmp_path, backends, procs):
    v1, v2 = backends
    gw_port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(gw_port, v1.port, v2.port, weights=(100, 0)))
    data = tmp_path / "cp-data"
    cp = control_plane(procs, tmp_path, config, data)
    proxy = start_proxy(procs, tmp_path, cp.address)
    # an apply: acknowledged only once it is in the data directory
    shifted = tmp_path / "shift.yaml"
    shifted.write_text(mesh_config(gw_port, v1.port, v2.port, weights=(0, 100)).split("---\n")[-1])
    r = cp.cli("apply", "-f", str(shifted))
    assert r.returncode == 0, r.stderr
    version = proxy.wait_for(lambda: (s := served(proxy))[1] == [s[0]] * 2 and s[0] and get(gw_port, "/")[1].startswith("v2") and s[0],
                             "the applied config served")
    cp_version, reloads_before = cp.status()["config_version"], reloads(proxy)

    load = Load(gw_port)
    time.sleep(0.5)
    sigkill(cp)
    proxy.wait_for(lambda: not proxy.config_dump()["controlplane"]["connected"], "disconnect noticed")
    cp2 = control_plane(procs, tmp_path, config, data, port=cp.port)
    proxy.wait_for(lambda: (c := proxy.config_dump()["controlplane"])["connected"] and c["connects"] == 2, "reconnected")
    time.sleep(0.5)
    result = load.finish()

    assert result.failures == [] and result.ok > 100
    assert Counter(body.split()[0] for _, body in result.bodies) == Counter(v2=len(result.bodies))
    # the same version and content from the restarted control plane; nothing reached the workers
    assert cp2.status()["config_version"] == cp_version
    assert served(proxy) == (version, [version, version]) and reloads(proxy) == reloads_before
    assert [(p["node_id"], p.get("connected", True), p.get("acked_version")) for p in cp2.status()["proxies"]] == [
        (NODE, True, version)]
    assert '"proxy_resumed"' in cp2.log_text()


def test_a_second_replica_takes_over_when_the_first_is_killed(tmp_path, backends, procs):
    v1, v2 = backends
    gw_port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(gw_port, v1.port, v2.port, weights=(100, 0)))
    replicas = [control_plane(procs, tmp_path, config, tmp_path / f"data-{i}") for i in range(2)]
    proxy = start_proxy(procs, tmp_path, ",".join(cp.address for cp in replicas))
    version = proxy.config_dump()["version"]
    first = proxy.wait_for(lambda: proxy.config_dump()["controlplane"]["connected_to"], "connected")
    serving, other = (replicas if first == replicas[0].address else replicas[::-1])
    reloads_before = reloads(proxy)

    load = Load(gw_port)
    time.sleep(0.5)
    sigkill(serving)
    started = time.monotonic()
    proxy.wait_for(lambda: (c := proxy.config_dump()["controlplane"])["connected"] and c["connected_to"] == other.address,
                   "moved to the other replica")
    moved_s = time.monotonic() - started
    time.sleep(0.5)
    result = load.finish()

    assert result.failures == [] and result.ok > 100
    assert moved_s < 5.0
    assert served(proxy) == (version, [version, version]) and reloads(proxy) == reloads_before
    assert [(p["node_id"], p.get("acked_version")) for p in other.status()["proxies"]] == [(NODE, version)]
    assert '"proxy_resumed"' in other.log_text()  # the replica sent no snapshot: the proxy had its version
