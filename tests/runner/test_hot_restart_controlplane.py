"""Hot restart of a real `triomesh proxy --controlplane` under wrk load, against a real `triomesh
controlplane`: the new process takes the stream over under the same (default) node id, serves the
same version, and the control plane lists one proxy, connected, its registration kept."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tests.runner.harness import (
    Backend,
    ControlPlane,
    Proxy,
    free_port,
    get,
    mesh_config,
)
from tests.runner.test_controlplane_proxy import served_version
from tests.runner.test_hot_restart import _events, _wait_exit

WRK_DURATION_S = 7


def _events_named(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def test_hot_restart_under_a_control_plane_keeps_one_proxy_and_its_version(tmp_path: Path) -> None:
    backend = Backend("v1")
    gw_port, admin_port = free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(gw_port, backend.port, backend.port))
    cp = ControlPlane(config, tmp_path).start()  # grace period 2 s
    path = str(tmp_path / "hot-restart.sock")
    started: list[Proxy] = []

    def start(*, wait_ready: bool) -> Proxy:
        # no --node-id: both processes take the default, HOSTNAME.ADMIN_PORT, the same admin port
        proxy = Proxy(None, tmp_path, concurrency=2, admin_port=admin_port, access_log="off",
                      extra_args=["--controlplane", cp.address, "--controlplane-plaintext", "--namespace", "test",
                                  "--label", "app=edge", "--register", "127.0.0.1",
                                  "--hot-restart-socket", path, "--drain-duration", "5s"])
        started.append(proxy)
        return proxy.start(wait_ready=wait_ready)

    wrk = None
    try:
        old = start(wait_ready=True)
        node_id = old.config_dump()["controlplane"]["node_id"]

        def synced() -> str | None:
            # its registration changes the version once: wait until the proxy serves and ACKed the last
            version = old.config_dump()["version"]
            listed = [(p["node_id"], p.get("connected", True), p.get("acked_version")) for p in cp.status()["proxies"]]
            return version if listed == [(node_id, True, version)] and served_version(old) == version else None

        version = old.wait_for(synced, "the first proxy registered and ACKed", timeout_s=30)
        cp_records_before = len(cp.log_records())
        wrk = subprocess.Popen(["wrk", "-t", "1", "-c", "16", "-d", f"{WRK_DURATION_S}s",
                                f"http://127.0.0.1:{gw_port}/load"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.5)
        new = start(wait_ready=False)
        assert _wait_exit(old) == 0, old.log_text()[-3000:]
        out = wrk.communicate(timeout=WRK_DURATION_S + 30)[0].decode()

        # no failed request: wrk prints these lines only when something failed
        assert "Socket errors" not in out and "Non-2xx" not in out, out
        requests = re.search(r"(\d+) requests in", out)
        assert requests and int(requests.group(1)) > 500, out
        # the new process serves the same version, got over its own stream
        dump = new.config_dump()
        assert dump["version"] == version and all(w["version"] == version for w in dump["workers"])
        assert dump["controlplane"]["node_id"] == node_id and dump["controlplane"]["connected"]
        assert "hot_restart_complete" in _events(new)
        # the control plane: one proxy, connected, ACKed the same version; the handover happened once
        # (the new stream replaced the old one) and nothing was unregistered or expired
        proxies = cp.status()["proxies"]
        assert [(p["node_id"], p.get("connected", True), p.get("acked_version")) for p in proxies] == [
            (node_id, True, version)], proxies
        records = cp.log_records()[cp_records_before:]
        assert len(_events_named(records, "proxy_connected")) == 1, records
        assert not [r for r in records if r.get("event") in
                    ("proxy_expired", "workload_unregistered", "workload_expired", "workload_registration_refused")], records
        # the old process stopped reconnecting once it handed over: one stream in its whole life
        assert len(_events_named(old.log_records(), "controlplane_connected")) == 1, old.log_text()[-3000:]
        assert _events_named(old.log_records(), "controlplane_reconnect_held")
        # still one proxy past the grace period (an end of the old stream unregisters nothing later)
        time.sleep(2.5)
        assert [(p["node_id"], p.get("connected", True)) for p in cp.status()["proxies"]] == [(node_id, True)]
        assert not _events_named(cp.log_records(), "proxy_expired")
        assert get(gw_port, "/after") == (200, "v1 /after")
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        for proxy in reversed(started):
            proxy.stop()
        cp.stop()
        backend.close()
