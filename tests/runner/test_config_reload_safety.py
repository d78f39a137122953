"""Config file updates under traffic, with the real proxy: a file is applied only once its writer
closed it or it was renamed into place (a `..data` symlink swap too), an update whose listener cannot
bind is rejected with the old listeners serving, and every rejection shows in /config_status."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.runner.harness import Backend, Proxy, free_port, get, keepalive_load, mesh_config, route_to

LOAD_MAX_S = 8.0


@pytest.fixture
def backends():
    v1, v2 = Backend("v1"), Backend("v2")
    yield v1, v2
    v1.close()
    v2.close()


@pytest.fixture
def proxies():
    started: list[Proxy] = []
    yield started
    for p in started:
        p.stop()


class BackgroundLoad:
    """keep-alive requests to `/only-v1` in a thread until stopped (bounded in count and time)."""

    def __init__(self, port: int) -> None:
        self._stop = threading.Event()
        self.result = None
        self._thread = threading.Thread(target=self._run, args=(port,))
        self._thread.start()

    def _run(self, port: int) -> None:
        self.result = keepalive_load(port, "/only-v1", connections=4, total=20_000, max_s=LOAD_MAX_S, stop=self._stop)

    def finish(self):
        self._stop.set()
        self._thread.join(LOAD_MAX_S + 35)
        return self.result


def _config(gateway_port: int, v1: Backend, v2: Backend, subset: str = "v1", **kw) -> str:
    return mesh_config(gateway_port, v1.port, v2.port, extra_routes=route_to("/only-v1", subset), **kw)


def _events(proxy: Proxy, name: str) -> list[dict]:
    return [r for r in proxy.log_records() if r.get("event") == name]


def _status(proxy: Proxy) -> dict:
    code, text = proxy.admin("/config_status")
    assert code == 200, text
    return json.loads(text)


def _start(tmp_path: Path, config: Path, proxies: list[Proxy]) -> Proxy:
    proxy = Proxy(config, tmp_path)
    proxies.append(proxy)
    return proxy.start()


def test_file_written_in_two_halves_is_applied_only_when_closed(tmp_path: Path, backends, proxies) -> None:
    v1, v2 = backends
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(port, v1, v2))
    proxy = _start(tmp_path, config, proxies)
    new_text = _config(port, v1, v2, subset="v2")
    cut = new_text.index("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")
    load = BackgroundLoad(port)
    try:
        with open(config, "w") as f:  # `generate > gateway.yaml`: truncated, half written, a pause
            f.write(new_text[:cut])
            f.flush()
            time.sleep(2.5)  # longer than the poll interval, the settle delay and the removal check
            f.write(new_text[cut:])
        proxy.wait_version("2")
    finally:
        result = load.finish()
    assert result.failures == [], result.failures[:5]
    assert result.ok > 50
    assert get(port, "/only-v1")[1] == "v2 /only-v1"
    # one update applied, the whole file: the half never became a version of its own
    assert proxy.stats("triomesh_config_reloads_total") == {(("result", "applied"),): 1,
                                                            (("result", "rejected"),): 0}


def test_rename_into_place_applies_at_once(tmp_path: Path, backends, proxies) -> None:
    v1, v2 = backends
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "gateway.yaml").write_text(_config(port, v1, v2))
    proxy = _start(tmp_path, config, proxies)
    staged = tmp_path / "gateway.yaml.new"  # outside the directory: written at leisure
    staged.write_text(_config(port, v1, v2, subset="v2"))
    started = time.monotonic()
    os.rename(staged, config / "gateway.yaml")
    proxy.wait_version("2")
    # inotify's IN_MOVED_TO, the quiet period and the settle read, not the once-a-second poll
    assert time.monotonic() - started < 2.0
    assert get(port, "/only-v1")[1] == "v2 /only-v1"


def test_configmap_symlink_swap_applies(tmp_path: Path, backends, proxies) -> None:
    """Kubernetes' atomic writer: files in a timestamped directory, `..data` pointing at it, each
    config name a symlink through `..data`; an update renames a new `..data` over the old one."""
    v1, v2 = backends
    port = free_port()
    config = tmp_path / "configmap"
    (config / "..2026_01").mkdir(parents=True)
    (config / "..2026_01" / "gateway.yaml").write_text(_config(port, v1, v2))
    os.symlink("..2026_01", config / "..data")
    os.symlink("..data/gateway.yaml", config / "gateway.yaml")
    proxy = _start(tmp_path, config, proxies)
    assert get(port, "/only-v1")[1] == "v1 /only-v1"

    (config / "..2026_02").mkdir()
    (config / "..2026_02" / "gateway.yaml").write_text(_config(port, v1, v2, subset="v2"))
    os.symlink("..2026_02", config / "..data_tmp")
    os.rename(config / "..data_tmp", config / "..data")
    proxy.wait_version("2", timeout_s=10)
    assert get(port, "/only-v1")[1] == "v2 /only-v1"


def test_unbindable_listener_is_rejected_and_the_old_one_serves(tmp_path: Path, backends, proxies) -> None:
    v1, v2 = backends
    port, taken = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(port, v1, v2))
    proxy = _start(tmp_path, config, proxies)
    holder = socket.socket()  # no SO_REUSEPORT: the proxy's workers cannot share it
    holder.bind(("127.0.0.1", taken))
    holder.listen(1)
    load = BackgroundLoad(port)
    try:
        staged = tmp_path / "staged"
        staged.write_text(_config(port, v1, v2, subset="v2", extra_gateway_ports=(taken,)))
        os.rename(staged, config)
        status = proxy.wait_for(lambda: (s := _status(proxy))["last_rejected"] and s, "a rejected update")
    finally:
        result = load.finish()
    assert result.failures == [], result.failures[:5]
    rejected = status["last_rejected"]
    assert rejected["reason"] == "listener_bind"
    assert f"127.0.0.1:{taken}" in rejected["error"] and "in use" in rejected["error"]
    assert rejected["file"] == str(config) and rejected["version"] == "2"
    assert status["version"] == "1" and status["status"] == "SYNCED"
    assert status["rejections"] == {"listener_bind": 1}
    assert proxy.config_dump()["last_rejected"] == rejected
    assert proxy.stats("triomesh_config_rejections_total") == {(("reason", "listener_bind"),): 1}
    assert proxy.admin("/ready")[0] == 200
    assert get(port, "/only-v1")[1] == "v1 /only-v1"  # the old config, both listeners kept
    assert all(w["version"] == "1" and w["listeners"] == [f"127.0.0.1_{port}"]
               for w in proxy.config_dump()["workers"])

    holder.close()  # the port is free now: SIGHUP reads the same files again and they apply
    proxy.signal(__import__("signal").SIGHUP)
    proxy.wait_version("2")
    assert get(taken, "/only-v1")[1] == "v2 /only-v1"


def test_empty_file_applies_only_when_it_stays_empty(tmp_path: Path, backends, proxies) -> None:
    v1, v2 = backends
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(port, v1, v2))
    proxy = _start(tmp_path, config, proxies)

    # `: > gateway.yaml; sleep 0.4; generate > gateway.yaml`: two writers, the empty file closed
    # in between; the removal check reads it again and never serves the empty config
    load = BackgroundLoad(port)
    try:
        config.write_text("")
        time.sleep(0.4)
        config.write_text(_config(port, v1, v2, subset="v2"))
        proxy.wait_for(lambda: get(port, "/only-v1")[1] == "v2 /only-v1", "the rewritten config", timeout_s=10)
        time.sleep(1.5)  # what a late reload of the empty file would have needed
    finally:
        result = load.finish()
    assert result.failures == [], result.failures[:5]
    assert _events(proxy, "config_removes_all_listeners") == []
    assert get(port, "/only-v1")[1] == "v2 /only-v1"

    # an empty file that stays empty is what the operator wants: applied, loudly
    version = proxy.config_dump()["version"]
    config.write_text("")
    expected = str(int(version) + 1)
    proxy.wait_version(expected, timeout_s=10)
    [warning] = _events(proxy, "config_removes_all_listeners")
    assert warning["level"] == "warning"
    assert (warning["listeners_before"], warning["listeners_after"]) == (1, 0)
    assert warning["files"] == {str(config): 0}
    with pytest.raises(ConnectionRefusedError):
        get(port, "/only-v1")
    assert proxy.admin("/ready")[0] == 200  # it serves what the files say


def test_directory_written_file_by_file_is_one_update(tmp_path: Path, backends, proxies) -> None:
    v1, v2 = backends
    port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    text = _config(port, v1, v2)
    cut = text.index("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")
    (config / "a.yaml").write_text(text[:cut])
    (config / "b.yaml").write_text(text[cut:])
    proxy = _start(tmp_path, config, proxies)

    new = _config(port, v1, v2, subset="v2", extra_gateway_ports=(free_port(),))
    cut = new.index("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")
    (config / "a.yaml").write_text(new[:cut])  # a second listener
    time.sleep(0.05)
    (config / "b.yaml").write_text(new[cut:])  # /only-v1 to v2
    proxy.wait_version("2")
    time.sleep(1.5)  # a second update would show by now
    assert proxy.stats("triomesh_config_reloads_total") == {(("result", "applied"),): 1,
                                                            (("result", "rejected"),): 0}
    assert len(proxy.config_dump()["workers"][0]["listeners"]) == 2
    assert get(port, "/only-v1")[1] == "v2 /only-v1"
