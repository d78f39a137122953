"""`triomesh proxy` as a real process tree: workers, admin, reloads (SIGHUP and file change),
rejected configs, worker restarts, shutdown. Real backends, real sockets, curl where it fits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.runner.harness import (
    REPO_ROOT,
    Backend,
    Proxy,
    free_port,
    get,
    keepalive_load,
    mesh_config,
    replace_keeping_fingerprint,
    route_to,
)


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


@pytest.fixture
def setup(tmp_path: Path, backends, proxies):
    """(proxy factory, config path, gateway port, v1, v2)."""
    v1, v2 = backends
    gateway_port = free_port()
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(gateway_port, v1.port, v2.port,
                                                  extra_routes=route_to("/only-v1", "v1")))

    def start(**kw) -> Proxy:
        p = Proxy(config, tmp_path, **kw)
        proxies.append(p)
        return p.start()

    return start, config / "mesh.yaml", gateway_port, v1, v2


def _curl(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, curl's error) when no response came."""
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
                       capture_output=True, text=True, check=False)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code), body) if code and code != "000" else (0, r.stderr.strip())


def _total(samples: dict) -> float:
    return sum(samples.values())


def test_ready_stats_summed_over_two_workers_and_config_dump(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=2)
    assert proxy.admin("/ready") == (200, "LIVE\n")
    n = 60
    for i in range(n):  # a fresh connection each: the kernel spreads them over both workers
        assert _curl(port, f"/only-v1/{i}") == (200, f"v1 /only-v1/{i}")

    rq = proxy.stats("triomesh_downstream_rq_total")
    assert rq == {(("response_code", "200"),): n}
    upstream = proxy.stats("triomesh_upstream_rq_total")
    assert upstream == {(("cluster", "outbound|80|v1|backend"), ("response_code", "200")): n}
    assert _total(proxy.stats("triomesh_downstream_cx_total")) == n
    assert proxy.stats("triomesh_config_reloads_total") == {(("result", "applied"),): 0, (("result", "rejected"),): 0}

    # both workers served some of them (their access-log lines carry the worker index)
    lines = proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "access"] if len(
        [r for r in proxy.log_records() if r.get("event") == "access"]) >= n else None, "access log lines", 5)
    assert len(lines) == n
    by_worker = Counter(r["worker"] for r in lines)
    assert set(by_worker) == {0, 1}, by_worker
    line = lines[0]
    assert line["status"] == 200 and line["method"] == "GET" and line["path"].startswith("/only-v1/")
    assert line["cluster"] == "outbound|80|v1|backend" and line["response_flags"] == "-"
    assert line["upstream_host"].startswith("127.0.0.1:")

    dump = proxy.config_dump()
    assert dump["version"] == "1"
    assert [w["version"] for w in dump["workers"]] == ["1", "1"]
    assert len({w["pid"] for w in dump["workers"]}) == 2
    assert dump["config"]["version"] == "1"
    assert f"127.0.0.1_{port}" in str(dump["config"]["listeners"])


def test_no_route_is_404_with_NR_in_access_log_and_stats(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=1)
    cfg = setup[1]
    # a host nothing routes: replace the catch-all VirtualService host with a named one
    cfg.write_text(cfg.read_text().replace('hosts: ["*"]\n  gateways', 'hosts: [shop.example]\n  gateways'))
    proxy.wait_version("2")
    status, _ = _curl(port, "/x")
    assert status == 404
    assert proxy.stats("triomesh_response_flags_total") == {(("flag", "NR"),): 1}
    rec = proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "access"], "access line", 5)
    assert rec[0]["status"] == 404 and rec[0]["response_flags"] == "NR"


def test_dead_upstream_is_503_with_UF_in_access_log_and_stats(setup) -> None:
    start, _, port, v1, _ = setup
    proxy = start(concurrency=1)
    v1.close()  # connection refused from now on
    status, _ = _curl(port, "/only-v1/dead")
    assert status == 503
    rec = proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "access"], "access line", 5)
    assert rec[0]["status"] == 503 and "UF" in rec[0]["response_flags"].split(","), rec[0]
    assert rec[0]["cluster"] == "outbound|80|v1|backend"
    assert proxy.stats("triomesh_response_flags_total").get((("flag", "UF"),)) == 1
    assert proxy.stats("triomesh_upstream_cx_connect_fail_total")[(("cluster", "outbound|80|v1|backend"),)] >= 1


def test_sighup_reload_adds_a_route(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2)
    status, _ = _curl(port, "/new")
    assert status == 200  # the weighted split catches it for now
    new_text = mesh_config(port, v1.port, v2.port, extra_routes=route_to("/only-v1", "v1") + route_to("/new", "v2"))
    # same size and mtime as before: the poller cannot see it, only SIGHUP can
    old_text = cfg.read_text()
    cfg.write_text(old_text + "#" * (len(new_text) - len(old_text) + 40) + "\n")
    proxy.wait_version("2")
    replace_keeping_fingerprint(cfg, new_text)
    time.sleep(2.5)  # two poll intervals: nothing may happen without the signal
    assert proxy.config_dump()["version"] == "2"

    proxy.signal(signal.SIGHUP)
    dump = proxy.wait_version("3")
    assert "/new" in str(dump["config"])
    for _ in range(20):
        assert _curl(port, "/new/x") == (200, "v2 /new/x")
    assert _curl(port, "/only-v1/y") == (200, "v1 /only-v1/y")
    reloads = [r for r in proxy.log_records() if r.get("event") == "config_reloaded"]
    assert [(r["reason"], r["version"]) for r in reloads] == [("file_changed", "2"), ("SIGHUP", "3")]
    assert proxy.stats("triomesh_config_reloads_total")[(("result", "applied"),)] == 2
    assert proxy.admin("/ready") == (200, "LIVE\n")


def test_sighup_with_unchanged_files_keeps_the_version(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=1)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "config_unchanged"], "unchanged log")
    assert proxy.config_dump()["version"] == "1"
    assert proxy.stats("triomesh_config_reloads_total") == {(("result", "applied"),): 0, (("result", "rejected"),): 0}


def test_invalid_config_is_refused_and_the_old_one_keeps_serving(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2)
    good = cfg.read_text()
    # a weight that is not a number, in the VirtualService (document 3), first http route's destination
    bad = mesh_config(port, v1.port, v2.port, weights=(80, 20),
                      extra_routes="  - route: [{destination: {host: backend, subset: v1}, weight: lots}]\n")
    cfg.write_text(bad)
    proxy.wait_for(lambda: proxy.stats("triomesh_config_reloads_total").get((("result", "rejected"),)) == 1,
                   "rejected counter")
    rejected = [r for r in proxy.log_records() if r.get("event") == "config_rejected"]
    assert len(rejected) == 1
    err = rejected[0]
    assert err["level"] == "error"
    assert err["file"] == str(cfg) and err["document"] == 3
    assert err["kind"] == "VirtualService" and err["name"] == "test/backend"
    assert err["field_path"] == "$.spec.http[0].route[0].weight"
    assert err["keeping_version"] == "1"

    dump = proxy.config_dump()
    assert dump["version"] == "1" and all(w["version"] == "1" for w in dump["workers"])
    assert proxy.admin("/ready") == (200, "LIVE\n")
    for _ in range(10):
        assert _curl(port, "/only-v1/z") == (200, "v1 /only-v1/z")

    # a reference to an unknown subset fails in the compiler, not the loader: refused as well
    cfg.write_text(good.replace("subset: v1}}]", "subset: v9}}]"))
    proxy.wait_for(lambda: proxy.stats("triomesh_config_reloads_total").get((("result", "rejected"),)) == 2,
                   "second rejection")
    assert "v9" in [r for r in proxy.log_records() if r.get("event") == "config_rejected"][-1]["error"]
    assert _curl(port, "/only-v1/z") == (200, "v1 /only-v1/z")

    cfg.write_text(good + "\n")  # fixed: applied as the next version
    proxy.wait_version("2")
    assert proxy.stats("triomesh_config_reloads_total") == {(("result", "applied"),): 1, (("result", "rejected"),): 2}


def test_file_change_is_picked_up_without_sighup(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2)
    cfg.write_text(mesh_config(port, v1.port, v2.port, weights=(0, 100)))
    proxy.wait_version("2", timeout_s=5)
    bodies = {_curl(port, "/any")[1] for _ in range(20)}
    assert bodies == {"v2 /any"}
    # a new file in the directory counts too
    (cfg.parent / "zz-more.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: more, namespace: test}\n"
        "spec: {hosts: [more.example], resolution: STATIC, ports: [{number: 80, name: http, protocol: HTTP}],\n"
        "       endpoints: [{address: 127.0.0.1}]}\n")
    dump = proxy.wait_version("3", timeout_s=5)
    assert dump["files"] == [str(cfg), str(cfg.parent / "zz-more.yaml")]


def test_listeners_are_added_and_removed_on_reload(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2)
    second = free_port()
    cfg.write_text(mesh_config(port, v1.port, v2.port, extra_gateway_ports=(second,), weights=(100, 0)))
    dump = proxy.wait_version("2")
    assert all(sorted(w["listeners"]) == sorted([f"127.0.0.1_{port}", f"127.0.0.1_{second}"]) for w in dump["workers"])
    assert _curl(second, "/a") == (200, "v1 /a")
    cfg.write_text(mesh_config(port, v1.port, v2.port, weights=(100, 0)))
    proxy.wait_version("3")
    assert _curl(second, "/a")[0] == 0  # connection refused: nobody listens there any more
    assert _curl(port, "/a") == (200, "v1 /a")


def test_request_in_flight_finishes_when_its_listener_and_route_go_away(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=1)
    second = free_port()
    cfg.write_text(mesh_config(port, v1.port, v2.port, extra_gateway_ports=(second,),
                               extra_routes=route_to("/slow", "v2")))
    proxy.wait_version("2")
    results = {}
    slow = threading.Thread(target=lambda: results.setdefault("r", _curl(second, "/slow/1")))
    slow.start()
    proxy.wait_for(lambda: _total(proxy.stats("triomesh_upstream_cx_active")) >= 1, "the slow request upstream", 5)
    # the new config has neither the second listener nor the /slow route
    cfg.write_text(mesh_config(port, v1.port, v2.port, weights=(100, 0)))
    proxy.signal(signal.SIGHUP)
    proxy.wait_version("3")
    assert _curl(second, "/slow/2")[0] == 0  # the listener is gone for new connections
    slow.join(10)
    assert results["r"] == (200, "v2 /slow/1")  # but the request that started on version 2 finished on it
    assert _curl(port, "/slow/3") == (200, "v1 /slow/3")


def test_killed_worker_is_replaced(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=2)
    for i in range(20):
        assert _curl(port, "/only-v1/k")[0] == 200
    assert _total(proxy.stats("triomesh_downstream_rq_total")) == 20
    before = proxy.config_dump()["workers"]
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        workers = proxy.config_dump()["workers"]
        w0 = workers[0]
        return w0["pid"] not in (None, victim) and w0["version"] == "1" and proxy.admin("/ready")[0] == 200

    proxy.wait_for(replaced, "worker 0 replaced")
    after = proxy.config_dump()["workers"]
    assert after[1]["pid"] == before[1]["pid"] and after[0]["restarts"] == 1
    assert proxy.stats("triomesh_worker_restarts_total") == {(): 1}
    exited = [r for r in proxy.log_records() if r.get("event") == "worker_exited"]
    assert exited and exited[0]["pid"] == victim and exited[0]["signal"] == "SIGKILL"
    for i in range(20):
        assert _curl(port, "/only-v1/k")[0] == 200
    # the dead worker's counters, as last reported, are still in the sums
    assert _total(proxy.stats("triomesh_downstream_rq_total")) == 40


def test_a_stalled_worker_keeps_its_counts_in_the_sums(setup) -> None:
    """A worker that cannot answer a scrape in time (here: stopped by SIGSTOP) is summed with the
    counts of its last answer, so no counter goes backwards between two scrapes."""
    start, _, port, _, _ = setup
    proxy = start(concurrency=2)
    n = 30
    for i in range(n):  # a fresh connection each: the kernel spreads them over both workers
        assert _curl(port, f"/only-v1/{i}")[0] == 200
    assert _total(proxy.stats("triomesh_downstream_rq_total")) == n
    lines = proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "access"] if len(
        [r for r in proxy.log_records() if r.get("event") == "access"]) >= n else None, "access log lines", 5)
    by_worker = Counter(r["worker"] for r in lines)
    assert by_worker[0] > 0, by_worker  # else the stalled worker's counts could not go missing
    stalled = proxy.config_dump()["workers"][0]["pid"]
    os.kill(stalled, signal.SIGSTOP)
    try:
        assert _total(proxy.stats("triomesh_downstream_rq_total")) == n
        assert _total(proxy.stats("istio_requests_total")) == n
    finally:
        os.kill(stalled, signal.SIGCONT)
    late = [r for r in proxy.log_records() if r.get("event") == "worker_stats_late"]
    assert late and late[0]["pid"] == stalled and late[0]["stale"] is True
    assert _curl(port, "/only-v1/after")[0] == 200
    proxy.wait_for(lambda: _total(proxy.stats("triomesh_downstream_rq_total")) == n + 1, "the next request counted")


def test_sigterm_stops_every_process(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=2)
    pids = [w["pid"] for w in proxy.config_dump()["workers"]]
    assert proxy.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _curl(port, "/")[0] == 0


def test_workers_exit_when_the_supervisor_is_killed(setup) -> None:
    start, _, _, _, _ = setup
    proxy = start(concurrency=2)
    pids = [w["pid"] for w in proxy.config_dump()["workers"]]
    proxy.proc.kill()
    proxy.proc.wait(5)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    states = {pid: _proc_state(pid) for pid in alive}
    for pid in alive:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"orphaned workers {states}\n{proxy.log_text()[-3000:]}"


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return " ".join(l.strip() for l in f if l.startswith(("State", "PPid")))
    except FileNotFoundError:
        return "gone"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie whose parent died is reaped by init soon; treat a zombie as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_access_log_off_writes_no_lines(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=1, access_log="off")
    for _ in range(5):
        status, body = _curl(port, "/only-v1/q")
        assert status == 200, (status, body, proxy.log_text()[-3000:])
    time.sleep(1.5)  # longer than the worker's access-log flush interval
    assert not [r for r in proxy.log_records() if r.get("event") == "access"]


def test_access_log_console(setup) -> None:
    start, _, port, _, _ = setup
    proxy = start(concurrency=1, access_log="console")
    assert _curl(port, "/only-v1/c")[0] == 200
    proxy.wait_for(lambda: "/only-v1/c" in proxy.log_text(), "console access line", 5)
    line = next(l for l in proxy.log_text().splitlines() if "/only-v1/c" in l)
    assert not line.startswith("{") and "access" in line and "status=200" in line


def test_log_level_filters_the_proxy_log_but_not_the_access_log(setup) -> None:
    start, cfg, port, _, _ = setup
    proxy = start(concurrency=1, log_level="error")
    assert _curl(port, "/only-v1/l")[0] == 200
    cfg.write_text("kind: Nonsense\n")
    proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "config_rejected"], "rejection", 5)
    proxy.wait_for(lambda: [r for r in proxy.log_records() if r.get("event") == "access"], "access line", 5)
    levels = {r["level"] for r in proxy.log_records() if r.get("event") != "access"}
    assert levels == {"error"}, levels


def test_console_log_format(setup) -> None:
    start, _, _, _, _ = setup
    proxy = start(concurrency=1, log_format="console")
    text = proxy.log_text()
    assert "config_loaded" in text and not any(l.startswith("{") for l in text.splitlines())


def test_invalid_initial_config_exits_1_with_the_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: n}\n"
                   "spec: {servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*'], colour: red}]}\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "proxy", "--config", str(cfg), "--concurrency", "1",
                        "--bind-address", "127.0.0.1", "--admin-address", f"127.0.0.1:{free_port()}"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "config_rejected" in r.stderr and str(cfg) in r.stderr and "$.spec.servers[0].colour" in r.stderr


def test_admin_port_in_use_exits_1(setup) -> None:
    start, cfg, _, _, _ = setup
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "proxy", "--config", str(cfg), "--concurrency", "1",
                            "--bind-address", "127.0.0.1", "--admin-address", f"127.0.0.1:{s.getsockname()[1]}"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "admin_bind_failed" in r.stderr


def test_weight_change_under_load_has_zero_failures(setup) -> None:
    """Issue 2: change the 80/20 split to 20/80 while keep-alive clients run; nothing fails, and the
    new split shows afterwards."""
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2)
    results = {}
    runner = threading.Thread(target=lambda: results.setdefault(
        "load", keepalive_load(port, "/split", connections=8, total=6000, max_s=30)))
    runner.start()
    # a quarter of the load on the old weights (the proxy's own count tells how far it got)
    proxy.wait_for(lambda: _total(proxy.stats("triomesh_downstream_rq_total")) >= 1500, "1500 requests", 20)
    t_reload = time.monotonic()
    cfg.write_text(mesh_config(port, v1.port, v2.port, weights=(20, 80), extra_routes=route_to("/only-v1", "v1")))
    proxy.signal(signal.SIGHUP)  # do not wait for the poller
    proxy.wait_version("2")
    t_applied = time.monotonic()
    runner.join(60)
    load = results["load"]
    assert load.failures == [], f"{len(load.failures)} failed requests, e.g. {load.failures[:5]}"
    assert load.ok == 6000

    before = Counter(body.split()[0] for t, body in load.bodies if t < t_reload)
    after = Counter(body.split()[0] for t, body in load.bodies if t > t_applied)
    assert sum(before.values()) >= 300 and sum(after.values()) >= 300, (before, after)
    # v2's share: about 0.2 before, about 0.8 after (binomial sd at n>=300 is < 2.4 points)
    assert abs(before["v2"] / sum(before.values()) - 0.2) < 0.1, before
    assert abs(after["v2"] / sum(after.values()) - 0.8) < 0.1, after
    assert _total(proxy.stats("triomesh_downstream_rq_total")) == 6000
    assert set(proxy.stats("triomesh_downstream_rq_total")) == {(("response_code", "200"),)}


@pytest.mark.skipif(not os.path.exists("/usr/bin/wrk"), reason="wrk is not installed (make system-deps installs it)")
def test_weight_changes_under_wrk_have_zero_errors(setup) -> None:
    start, cfg, port, v1, v2 = setup
    proxy = start(concurrency=2, access_log="off")
    wrk = subprocess.Popen(["wrk", "-t2", "-c16", "-d5s", "--timeout", "5s", f"http://127.0.0.1:{port}/split"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for version, weights in (("2", (50, 50)), ("3", (20, 80)), ("4", (80, 20))):
            time.sleep(1.0)
            cfg.write_text(mesh_config(port, v1.port, v2.port, weights=weights, extra_routes=route_to("/only-v1", "v1")))
            proxy.signal(signal.SIGHUP)
            proxy.wait_version(version)
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    assert wrk.returncode == 0, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    requests = int(next(l for l in out.splitlines() if "requests in" in l).split()[0])
    assert requests > 1000, out
    assert _total(proxy.stats("triomesh_downstream_rq_total")) >= requests
    assert set(proxy.stats("triomesh_downstream_rq_total")) == {(("response_code", "200"),)}
