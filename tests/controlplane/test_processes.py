"""The control plane and proxies as real processes: the CLIs (controlplane, apply, delete,
proxy-status), control-plane restart, proxy restart. Every process is started here and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cp_fixtures import SIDECAR_NARROW, split, write_mesh

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
SIM_PROXY = Path(__file__).with_name("sim_proxy.py")


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "controlplane.cli", *args], cwd=REPO, input=stdin, capture_output=True,
                          timeout=30)


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class ControlPlaneProcess:
    def __init__(self, tmp: Path, config: Path, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        self.port_file = tmp / f"cp-{time.monotonic_ns()}.port"
        self.log = open(tmp / "controlplane.log", "ab")
        self.proc = subprocess.Popen(
            [PY, "-m", "controlplane.cli", "controlplane", "--config", str(config), "--listen", f"127.0.0.1:{port}",
             "--port-file", str(self.port_file), "--insecure-plaintext", "--heartbeat-interval", "0.3", "--grace-period", "1",
             "--debounce", "0.05", "--poll-interval", "0.1", *extra],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        text = wait_until(lambda: self.port_file.exists() and self.port_file.read_text(), what="control plane port")
        self.port = int(text)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ProxyProcess:
    def __init__(self, tmp: Path, address: str, node_id: str, namespace: str, *, admin: str = "", **labels: str) -> None:
        self.out = tmp / f"{node_id}-{time.monotonic_ns()}.out"
        self.err = open(tmp / f"{node_id}.err", "ab")
        self.proc = subprocess.Popen([PY, str(SIM_PROXY), address, node_id, namespace,
                                      *(f"{k}={v}" for k, v in labels.items())],
                                     cwd=REPO, stdout=open(self.out, "wb"), stderr=self.err,
                                     env={**os.environ, "SIM_ADMIN_ADDRESS": admin})

    def applied(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.err.close()


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


def status(address: str) -> dict:
    r = cli("proxy-status", "--controlplane", address, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cli_apply_delete_and_proxy_status(tmp_path, procs):
    config = write_mesh(tmp_path / "config")
    cp = ControlPlaneProcess(tmp_path, config)
    procs.append(cp)
    proxy = ProxyProcess(tmp_path, cp.address, "customer-1", "tutorial", app="customer")
    procs.append(proxy)
    first = wait_until(proxy.applied, what="first snapshot")[0]
    assert first["routes"] == {"recommendation": [80, 20]}
    wait_until(lambda: status(cp.address)["proxies"][0].get("acked_version") == first["version"], what="acked")

    table = cli("proxy-status", "--controlplane", cp.address)
    assert table.returncode == 0
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "NAMESPACE", "ADDRESS", "STATUS", "ACKED", "SENT", "LAST", "NACK"]
    assert lines[1].split()[:5] == ["customer-1", "tutorial", "127.0.0.1", "SYNCED", first["version"]]

    change = tmp_path / "weights.yaml"
    change.write_text(split(10, 90))
    r = cli("apply", "-f", str(change), "--controlplane", cp.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["VirtualService tutorial/recommendation configured", "config version 2"]
    wait_until(lambda: proxy.applied()[-1]["routes"] == {"recommendation": [10, 90]}, what="new weights applied")

    bad = tmp_path / "bad.yaml"
    bad.write_text(split(10, 95))
    r = cli("apply", "-f", str(bad), "--controlplane", cp.address)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode() == (f"error: {bad}: document 0 (VirtualService tutorial/recommendation): "
                                 "$.spec.http[0].route: total destination weight 105 != 100\n")
    # stdin works too, and deleting the override brings the directory's version back
    r = cli("delete", "-f", "-", "--controlplane", cp.address, stdin=split(10, 90).encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[0] == "VirtualService tutorial/recommendation deleted"
    wait_until(lambda: proxy.applied()[-1]["routes"] == {"recommendation": [80, 20]}, what="file version back")
    assert [a["routes"]["recommendation"] for a in proxy.applied()] == [[80, 20], [10, 90], [80, 20]]
    # a control plane that is not there: a clear error, exit 1
    cp.stop()
    r = cli("proxy-status", "--controlplane", cp.address)
    assert r.returncode == 1 and b"error: control plane at 127.0.0.1:" in r.stderr


def test_the_heap_is_settled_after_start_up_and_after_each_change(tmp_path, procs):
    """controlplane/heap.py: a quiet second after start-up, and after a change, the control plane
    collects and freezes what survived (logged at debug)."""
    config = write_mesh(tmp_path / "config")
    cp = ControlPlaneProcess(tmp_path, config, extra=("--log-level", "debug"))
    procs.append(cp)

    def settles() -> list[dict]:
        lines = (tmp_path / "controlplane.log").read_text().splitlines()
        return [json.loads(l) for l in lines if '"heap_settled"' in l]

    first = wait_until(settles, what="settled after start-up")
    assert first[0]["frozen"] > 10_000 and first[0]["full"] is False
    change = tmp_path / "change.yaml"
    change.write_text(split(10, 90))
    assert cli("apply", "-f", str(change), "--controlplane", cp.address).returncode == 0
    wait_until(lambda: len(settles()) == 2, what="settled after the change")


def test_control_plane_restart_and_proxy_restart(tmp_path, procs):
    config = write_mesh(tmp_path / "config")
    cp = ControlPlaneProcess(tmp_path, config)
    procs.append(cp)
    a = ProxyProcess(tmp_path, cp.address, "a", "tutorial")
    procs.append(a)
    wait_until(a.applied, what="a synced")
    v1 = a.applied()[0]["version"]

    # the control plane goes away; the proxy keeps running on what it has
    cp.stop()
    time.sleep(0.5)
    assert a.proc.poll() is None and [x["version"] for x in a.applied()] == [v1]
    # the config changes while it is down; a new control plane on the same address resyncs the proxy
    (config / "routes.yaml").write_text(split(30, 70))
    cp2 = ControlPlaneProcess(tmp_path, config, port=cp.port)
    procs.append(cp2)
    wait_until(lambda: a.applied()[-1]["routes"] == {"recommendation": [30, 70]}, what="resync after restart")
    v2 = a.applied()[-1]["version"]
    wait_until(lambda: [(p["node_id"], p.get("acked_version")) for p in status(cp2.address)["proxies"]] == [("a", v2)],
               what="acked on the new control plane")

    # the proxy is killed and started again with the same node id: it syncs and is listed once
    a.stop(signal.SIGKILL)
    a2 = ProxyProcess(tmp_path, cp2.address, "a", "tutorial")
    procs.append(a2)
    wait_until(a2.applied, what="restarted proxy synced")
    assert a2.applied()[0]["version"] == v2
    wait_until(lambda: [(p["node_id"], p.get("connected", True), p.get("acked_version"))
                        for p in status(cp2.address)["proxies"]] == [("a", True, v2)], what="one entry, connected, acked")
    # an invalid file in the watched directory is refused; proxies stay on v2
    # (written in place: the control plane reads it once its writer has closed it, never half written)
    (config / "routes.yaml").write_text(split(30, 80))
    wait_until(lambda: "total destination weight 110 != 100" in (tmp_path / "controlplane.log").read_text(),
               what="the invalid file refused")
    # the restarted control plane kept its version (1) and counted the change made while it was down
    assert a2.applied()[-1]["version"] == v2 and status(cp2.address)["config_version"] == "2"
    assert "config_rejected" in (tmp_path / "controlplane.log").read_text()


def test_proxy_config_reads_the_admin_endpoint_of_a_proxy_found_by_node_id(tmp_path, procs):
    """The admin endpoint here is a plain HTTP server on loopback serving the /config_dump document a
    proxy would serve for this config (the runner's admin is tested in tests/runner)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from proxy.config.compile import compile_resources
    from proxy.config.load import load_path

    config = write_mesh(tmp_path / "config")
    (config / "sidecar.yaml").write_text(SIDECAR_NARROW.replace('["./preference"]', '["*/*"]'))
    dump = compile_resources(load_path(config), version="v7").dump
    body = json.dumps({"version": "v7", "config": dump}).encode()

    class Admin(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/config_dump"
            self.send_response(200 if ok else 404)
            self.send_header("content-length", str(len(body) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin = f"127.0.0.1:{server.server_address[1]}"
        cp = ControlPlaneProcess(tmp_path, config)
        procs.append(cp)
        proxy = ProxyProcess(tmp_path, cp.address, "gw-1", "tutorial", admin=admin)
        procs.append(proxy)
        wait_until(proxy.applied, what="synced")
        assert status(cp.address)["proxies"][0]["admin_address"] == admin
        r = cli("proxy-config", "clusters", "gw-1", "--controlplane", cp.address)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[0].split() == ["NAME", "LB", "ENDPOINTS"]
        assert "outbound|8080|v2|recommendation  ROUND_ROBIN  127.0.0.1:18084" in r.stdout.decode()
        assert lines[-1] == "config version v7"
        r = cli("proxy-config", "routes", admin)  # the admin address directly, no control plane needed
        assert r.returncode == 0, r.stderr
        assert "outbound|8080|v1|recommendation 80%, outbound|8080|v2|recommendation 20%" in r.stdout.decode()
        r = cli("proxy-config", "listeners", "nobody", "--controlplane", cp.address)
        assert r.returncode == 1 and r.stderr == b"error: no proxy 'nobody' is known to the control plane\n"
    finally:
        server.shutdown()
