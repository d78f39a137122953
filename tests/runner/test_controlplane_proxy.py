"""`triomesh proxy --controlplane` against `triomesh controlplane`, all real processes: config pushed
to a 2-worker proxy, `triomesh apply` shifting live traffic, proxy-status / proxy-config, wrk under a
config change every second, an invalid apply, control-plane restart, proxy restart, a bootstrap file.
Every process is started here and stopped by PID; every load is bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.runner.harness import (
    Backend,
    ControlPlane,
    Proxy,
    free_port,
    get,
    keepalive_load,
    mesh_config,
)

NODE = "gw-1"


def egress_gateway(port: int) -> str:
    """A Gateway for other proxies (its selector does not match ours). Our proxy receives it anyway
    (a VirtualService it receives names it), so only compiling with the proxy's labels, in the
    supervisor and in every worker, keeps its listener closed here."""
    return f"""apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: test}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: egress, namespace: test}}
spec:
  hosts: ["*"]
  gateways: [egress]
  http:
  - route: [{{destination: {{host: backend, subset: v2}}}}]
"""


def virtual_service(weights: tuple[int, int]) -> str:
    """mesh_config's VirtualService test/backend alone (the document `apply` replaces)."""
    return mesh_config(1, 1, 1, weights=weights).split("---\n")[-1]


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


@pytest.fixture
def mesh(tmp_path: Path, backends):
    """(config dir, gateway port, egress gateway port, v1, v2); weights 100/0."""
    v1, v2 = backends
    gw_port, egress_port = free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(gw_port, v1.port, v2.port, weights=(100, 0)))
    (config / "egress.yaml").write_text(egress_gateway(egress_port))
    return config, gw_port, egress_port, v1, v2


def start_proxy(procs: list, tmp_path: Path, cp_address: str, *, config: Path | None = None,
                admin_port: int | None = None, wait_ready: bool = True, **kw) -> Proxy:
    proxy = Proxy(config, tmp_path, concurrency=2, access_log="off",
                  extra_args=["--controlplane", cp_address, "--controlplane-plaintext", "--node-id", NODE, "--namespace", "test",
                              "--label", "istio=ingressgateway", "--label", "app=edge"], **kw)
    if admin_port is not None:
        proxy.admin_port = admin_port
    procs.append(proxy)
    return proxy.start(wait_ready=wait_ready)


def admin_up(proxy: Proxy) -> bool:
    if proxy.proc.poll() is not None:
        raise AssertionError(f"proxy exited with {proxy.proc.returncode}:\n{proxy.log_text()}")
    try:
        proxy.admin("/config_dump")
        return True
    except OSError:
        return False


def served_version(proxy: Proxy) -> str:
    """The version the supervisor and every worker serve ("" while they differ)."""
    dump = proxy.config_dump()
    return dump["version"] if all(w["version"] == dump["version"] for w in dump.get("workers", [])) else ""


def wall_time(record: dict) -> float:
    """A structlog JSON record's ISO timestamp (UTC) as time.time()."""
    from datetime import datetime

    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def backends_hit(port: int, n: int) -> Counter:
    out: Counter = Counter()
    for _ in range(n):
        status, body = get(port, "/")
        out[body.split()[0] if status == 200 else f"status {status}"] += 1
    return out


def test_proxy_runs_the_config_the_control_plane_pushes(tmp_path, mesh, procs) -> None:
    config, gw_port, egress_port, v1, v2 = mesh
    cp_port = free_port()
    # the proxy starts before the control plane: nothing to serve, not ready, retrying with back-off
    proxy = start_proxy(procs, tmp_path, f"127.0.0.1:{cp_port}", wait_ready=False)
    proxy.wait_for(lambda: admin_up(proxy), "admin endpoint")
    assert proxy.admin("/ready") == (503, "NOT_READY\n")
    dump = proxy.config_dump()
    assert dump["version"] == "" and dump["controlplane"]["connected"] is False
    assert dump["controlplane"]["node_id"] == NODE and dump["controlplane"]["labels"] == {
        "istio": "ingressgateway", "app": "edge"}

    cp = ControlPlane(config, tmp_path, port=cp_port).start()
    procs.append(cp)
    proxy.wait_ready()
    dump = proxy.config_dump()
    version = dump["version"]
    assert len(dump["workers"]) == 2
    # compiled with the proxy's labels, in the supervisor and in both workers: the egress Gateway
    # selects other proxies, so only the ingress listener opens
    assert [l["name"] for l in dump["config"]["listeners"]] == [f"127.0.0.1_{gw_port}"]
    assert all(w["version"] == version and w["listeners"] == [f"127.0.0.1_{gw_port}"] for w in dump["workers"]), dump
    assert dump["controlplane"]["connected"] is True and dump["controlplane"]["acked_version"] == version
    assert dump["files"] == [f"<controlplane version {version}>"]
    assert backends_hit(gw_port, 20) == Counter(v1=20)

    # proxy-status: the proxy with the version it ACKed
    status = proxy.wait_for(lambda: (s := cp.status())["proxies"] and s["proxies"][0].get("acked_version") == version
                            and s, "ACK seen by the control plane")
    assert [(p["node_id"], p["namespace"], p["labels"]) for p in status["proxies"]] == [
        (NODE, "test", {"istio": "ingressgateway", "app": "edge"})]
    r = cp.cli("proxy-status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "NAMESPACE", "ADDRESS", "STATUS", "ACKED", "SENT", "LAST", "NACK"]
    assert lines[1].split() == [NODE, "test", "127.0.0.1", "SYNCED", version, version, "-"]

    # proxy-config: what the proxy runs, from its admin endpoint found through the control plane
    r = cp.cli("proxy-config", "listeners", NODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[1].split() == [f"127.0.0.1_{gw_port}", "127.0.0.1", str(gw_port), "HTTP",
                                                        "OUTBOUND", "Gateway", "test/gw"]
    assert r.stdout.decode().splitlines()[-1] == f"config version {version}"
    r = cp.cli("proxy-config", "clusters", NODE)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert f"outbound|80|v1|backend  ROUND_ROBIN  127.0.0.1:{v1.port}" in text
    assert f"outbound|80|v2|backend  ROUND_ROBIN  127.0.0.1:{v2.port}" in text
    r = cp.cli("proxy-config", "routes", NODE)
    assert r.returncode == 0, r.stderr
    assert "outbound|80|v1|backend 100%, outbound|80|v2|backend 0%" in r.stdout.decode()

    # `triomesh apply` of new weights shifts live traffic within a second
    stop = threading.Event()
    box: list = []
    load = threading.Thread(target=lambda: box.append(
        keepalive_load(gw_port, "/", connections=4, total=20000, max_s=15, stop=stop)))
    load.start()
    try:
        time.sleep(0.5)
        change = tmp_path / "weights.yaml"
        change.write_text(virtual_service((0, 100)))
        launched = time.monotonic()
        wall_offset = time.time() - time.monotonic()
        r = cp.cli("apply", "-f", str(change))
        accepted = time.monotonic()
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines() == ["VirtualService test/backend configured", "config version 2"]
        new = proxy.wait_for(lambda: (v := served_version(proxy)) not in ("", version) and v, "new version served")
        time.sleep(1.5)
    finally:
        stop.set()
        load.join(30)
    result = box[0]
    assert result.failures == []
    last_v1 = max(t for t, body in result.bodies if body.startswith("v1"))
    # timed from the moment the control plane accepted the change (its log's clock is the wall clock)
    changed_at = wall_time(next(r for r in cp.log_records() if r["event"] == "config_changed" and r["reason"] == "apply"))
    shift_s = last_v1 + wall_offset - changed_at
    assert shift_s < 1.0, f"v1 still answered {shift_s:.3f}s after the control plane accepted the apply"
    print(f"traffic shifted {shift_s:.3f}s after the control plane accepted the change "
          f"({last_v1 - launched:.3f}s after `triomesh apply` started; it returned after {accepted - launched:.3f}s)")
    after = [body.split()[0] for t, body in result.bodies if t > accepted + 1.0]
    assert len(after) >= 50 and set(after) == {"v2"}
    r = cp.cli("proxy-config", "routes", NODE)
    assert "outbound|80|v1|backend 0%, outbound|80|v2|backend 100%" in r.stdout.decode()
    proxy.wait_for(lambda: cp.status()["proxies"][0].get("acked_version") == new, "new version ACKed")


@pytest.mark.skipif(not os.path.exists("/usr/bin/wrk"), reason="wrk is not installed (make system-deps installs it)")
def test_wrk_while_the_config_changes_every_second_has_zero_errors(tmp_path, mesh, procs) -> None:
    config, gw_port, _, v1, v2 = mesh
    cp = ControlPlane(config, tmp_path).start()
    procs.append(cp)
    proxy = start_proxy(procs, tmp_path, cp.address)
    acks_before = proxy.config_dump()["controlplane"]["acks"]
    change = tmp_path / "weights.yaml"
    versions = []
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", "-d6s", "--timeout", "5s", f"http://127.0.0.1:{gw_port}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        start = time.monotonic()
        for i, weights in enumerate(((50, 50), (20, 80), (80, 20), (0, 100), (100, 0))):
            time.sleep(max(0.0, start + 0.5 + i - time.monotonic()))  # one change a second
            change.write_text(virtual_service(weights))
            r = cp.cli("apply", "-f", str(change))
            assert r.returncode == 0, r.stderr
            versions.append(r.stdout.decode().splitlines()[-1])
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    assert versions == [f"config version {n}" for n in range(2, 7)]
    assert wrk.returncode == 0, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    requests = int(next(l for l in out.splitlines() if "requests in" in l).split()[0])
    assert requests > 1000, out
    print(out)  # shown with -s
    # every change reached the proxy (each push ACKed once its workers served it); the last one may
    # still be on its way when wrk ends
    dump = proxy.wait_for(lambda: (d := proxy.config_dump())["controlplane"]["acks"] - acks_before >= 5 and d,
                          "5 pushes ACKed")
    assert dump["controlplane"]["nacks"] == 0
    assert [l["name"] for l in dump["config"]["listeners"]] == [f"127.0.0.1_{gw_port}"]
    assert backends_hit(gw_port, 10) == Counter(v1=10)  # the last change: 100/0
    assert set(proxy.stats("triomesh_downstream_rq_total")) == {(("response_code", "200"),)}


def test_invalid_apply_controlplane_restart_and_proxy_restart(tmp_path, mesh, procs) -> None:
    config, gw_port, _, v1, v2 = mesh
    cp = ControlPlane(config, tmp_path).start()
    procs.append(cp)
    proxy = start_proxy(procs, tmp_path, cp.address)
    v_start = proxy.config_dump()["version"]

    # an invalid apply: refused with the precise error, nothing pushed, the proxy keeps serving
    bad = tmp_path / "bad.yaml"
    bad.write_text(virtual_service((80, 30)))
    r = cp.cli("apply", "-f", str(bad))
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode() == (f"error: {bad}: document 0 (VirtualService test/backend): "
                                 "$.spec.http[0].route: total destination weight 110 != 100\n")
    time.sleep(0.3)
    assert served_version(proxy) == v_start and backends_hit(gw_port, 10) == Counter(v1=10)
    assert "config_rejected" in cp.log_text()

    # the control plane goes away: the proxy keeps serving its last good snapshot
    cp.stop()
    proxy.wait_for(lambda: not proxy.config_dump()["controlplane"]["connected"], "disconnect noticed")
    assert proxy.admin("/ready") == (200, "LIVE\n")
    assert backends_hit(gw_port, 20) == Counter(v1=20)
    # the config changes meanwhile; a control plane started again on the same address resyncs the proxy
    (config / "mesh.yaml").write_text(mesh_config(gw_port, v1.port, v2.port, weights=(0, 100)))
    # its grace period outlasts the proxy's stop and restart below (a drain takes seconds on a loaded
    # machine), so the restarted proxy resumes its entry rather than registering after an expiry
    cp2 = ControlPlane(config, tmp_path, port=cp.port, grace_period_s=60).start()
    procs.append(cp2)
    v_resync = proxy.wait_for(lambda: (v := served_version(proxy)) not in ("", v_start) and v, "resync", timeout_s=20)
    assert backends_hit(gw_port, 20) == Counter(v2=20)
    assert proxy.config_dump()["controlplane"]["connects"] == 2
    proxy.wait_for(lambda: [(p["node_id"], p.get("connected", True), p.get("acked_version")) for p in cp2.status()["proxies"]]
                   == [(NODE, True, v_resync)], "ACKed on the new control plane")

    # the proxy restarts (same node id and admin address): synced again, listed once
    admin_port = proxy.admin_port
    assert proxy.stop() == 0
    proxy.wait_for(lambda: not cp2.status()["proxies"][0].get("connected", True), "proxy seen gone")
    proxy2 = start_proxy(procs, tmp_path, cp2.address, admin_port=admin_port)
    assert served_version(proxy2) == v_resync
    assert backends_hit(gw_port, 10) == Counter(v2=10)
    proxy2.wait_for(lambda: [(p["node_id"], p.get("connected", True), p.get("acked_version"))
                             for p in cp2.status()["proxies"]] == [(NODE, True, v_resync)], "listed once, ACKed")
    r = cp2.cli("proxy-status")
    assert [l.split()[0] for l in r.stdout.decode().splitlines()[1:-1]] == [NODE]


def test_bootstrap_config_serves_until_the_control_plane_pushes(tmp_path, mesh, procs) -> None:
    config, gw_port, _, v1, v2 = mesh
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(mesh_config(gw_port, v1.port, v2.port, weights=(0, 100)))
    cp_port = free_port()
    proxy = start_proxy(procs, tmp_path, f"127.0.0.1:{cp_port}", config=bootstrap)  # ready on the bootstrap
    assert proxy.config_dump()["version"] == "1" and backends_hit(gw_port, 10) == Counter(v2=10)
    # the bootstrap file is not watched once a control plane is the source; SIGHUP does not re-read it
    bootstrap.write_text(mesh_config(gw_port, v1.port, v2.port, weights=(50, 50)))
    proxy.signal(signal.SIGHUP)
    time.sleep(1.5)
    assert proxy.config_dump()["version"] == "1"
    cp = ControlPlane(config, tmp_path, port=cp_port).start()
    procs.append(cp)
    pushed = proxy.wait_for(lambda: (v := served_version(proxy)) not in ("", "1") and v, "first push", timeout_s=20)
    assert backends_hit(gw_port, 10) == Counter(v1=10)  # the control plane's 100/0
    proxy.signal(signal.SIGHUP)
    time.sleep(1.0)
    assert served_version(proxy) == pushed and backends_hit(gw_port, 10) == Counter(v1=10)


def registry_config(gw_port: int, api_port: int) -> str:
    """The `api` service has no endpoints of its own: its ServiceEntry selects workloads labelled
    app=api, which proxies register when they connect."""
    return f"""apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: test}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {gw_port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: test}}
spec:
  hosts: [api]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {api_port}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: api}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: test}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{{route: [{{destination: {{host: api}}}}]}}]
"""


def test_registered_workload_is_an_endpoint_until_its_grace_period_ends(tmp_path, backends, procs) -> None:
    _, v2 = backends
    gw_port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(registry_config(gw_port, v2.port))
    cp = ControlPlane(config, tmp_path).start()  # grace period 2 s
    procs.append(cp)
    gw = start_proxy(procs, tmp_path, cp.address)
    assert get(gw_port, "/")[0] == 503  # no endpoint yet
    # a workload's proxy registers itself (address 127.0.0.1, labels app=api): it becomes the endpoint
    api = Proxy(None, tmp_path, concurrency=1, access_log="off",
                extra_args=["--controlplane", cp.address, "--controlplane-plaintext", "--node-id", "api-1", "--namespace", "test",
                            "--label", "app=api", "--register", "127.0.0.1"])
    procs.append(api)
    api.start()
    assert api.config_dump()["config"]["listeners"] == []  # no Gateway selects it
    gw.wait_for(lambda: get(gw_port, "/")[0] == 200, "registered endpoint pushed to the gateway")
    assert backends_hit(gw_port, 5) == Counter(v2=5)
    r = cp.cli("proxy-status")
    assert [l.split()[:4] for l in r.stdout.decode().splitlines()[1:-1]] == [
        ["api-1", "test", "127.0.0.1", "SYNCED"], [NODE, "test", "127.0.0.1", "SYNCED"]]
    # the workload's proxy stops: it stays an endpoint for the grace period, then it is removed
    api.stop()
    stopped = time.monotonic()
    gone = gw.wait_for(lambda: get(gw_port, "/")[0] == 503 and time.monotonic(), "endpoint removed", timeout_s=10)
    assert 1.5 < gone - stopped < 5.0, gone - stopped
    gw.wait_for(lambda: [p["node_id"] for p in cp.status()["proxies"]] == [NODE], "api-1 forgotten")


def test_pushed_listener_that_cannot_bind_is_nacked_and_the_old_one_serves(tmp_path, mesh, procs) -> None:
    config, gw_port, _, v1, v2 = mesh
    cp = ControlPlane(config, tmp_path).start()
    procs.append(cp)
    proxy = start_proxy(procs, tmp_path, cp.address)
    v_start = proxy.config_dump()["version"]
    taken = free_port()
    with socket.socket() as holder:  # no SO_REUSEPORT: the proxy's workers cannot share it
        holder.bind(("127.0.0.1", taken))
        holder.listen(1)
        update = tmp_path / "update.yaml"
        update.write_text(mesh_config(gw_port, v1.port, v2.port, weights=(0, 100), extra_gateway_ports=(taken,)))
        assert cp.cli("apply", "-f", str(update)).returncode == 0
        [status] = proxy.wait_for(lambda: [p for p in cp.status()["proxies"] if p.get("last_nack")], "a NACK")
    assert f"cannot listen on 127.0.0.1:{taken}" in status["last_nack"]
    assert served_version(proxy) == v_start and backends_hit(gw_port, 10) == Counter(v1=10)
    rejected = json.loads(proxy.admin("/config_status")[1])["last_rejected"]
    assert (rejected["reason"], rejected["file"]) == ("listener_bind", f"controlplane {cp.address}")
    assert proxy.admin("/ready") == (200, "LIVE\n")
