"""Hot restart of a real `triomesh proxy` under load: a second proxy started with the same
--hot-restart-socket takes over the listening and admin sockets, the first drains and exits."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest

from proxy.runner import hot_restart
from proxy.runner.control import ListenerSocket
from tests.runner.harness import (
    Backend,
    LoadResult,
    Proxy,
    free_port,
    get,
    keepalive_load,
    mesh_config,
)
from tests.runner.test_drain import Slow


@pytest.fixture
def mesh(tmp_path: Path):
    """(start(concurrency, config text) -> Proxy, gateway port, backend port, hot restart path)."""
    backend = Backend("v1")
    port = free_port()
    admin_port = free_port()
    path = str(tmp_path / "hot-restart.sock")
    started: list[Proxy] = []

    def start(concurrency: int = 2, config_text: str | None = None, *, wait_ready: bool = True) -> Proxy:
        config = tmp_path / f"mesh-{len(started)}.yaml"
        config.write_text(config_text or mesh_config(port, backend.port, backend.port))
        proxy = Proxy(config, tmp_path, concurrency=concurrency, admin_port=admin_port, access_log="off",
                      extra_args=["--hot-restart-socket", path, "--drain-duration", "5s"])
        started.append(proxy)
        return proxy.start(wait_ready=wait_ready)

    yield start, port, backend.port, path
    for proxy in started:
        if proxy.proc is not None and proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(timeout=5)
    backend.close()


class Load:
    """A bounded keep-alive load (16 connections) in a thread, plus a thread opening a new connection
    every 10 ms: a refused or reset connect counts as a failure too."""

    def __init__(self, port: int, path: str = "/load", max_s: float = 8.0) -> None:
        self.stop = threading.Event()
        self.result = LoadResult()
        self.connects = 0
        self.connect_failures: list[str] = []
        self._threads = [
            threading.Thread(target=self._keepalive, args=(port, path, max_s)),
            threading.Thread(target=self._connects, args=(port, max_s)),
        ]
        for t in self._threads:
            t.start()

    def _keepalive(self, port: int, path: str, max_s: float) -> None:
        self.result = keepalive_load(port, path, connections=16, total=200_000, max_s=max_s, stop=self.stop)

    def _connects(self, port: int, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, _ = get(port, "/fresh", timeout_s=5)
                if status != 200:
                    self.connect_failures.append(f"status {status}")
            except OSError as e:
                self.connect_failures.append(f"{type(e).__name__}: {e}")
            self.connects += 1
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


def _wait_exit(proxy: Proxy, timeout_s: float = 15.0) -> int:
    return proxy.proc.wait(timeout=timeout_s)


def _events(proxy: Proxy) -> list[str]:
    return [r.get("event") for r in proxy.log_records()]


def test_hot_restart_under_load_loses_nothing_and_the_old_proxy_drains_and_exits(mesh) -> None:
    start, port, _, _ = mesh
    old = start(concurrency=2)
    load = Load(port)
    slow = None
    try:
        time.sleep(0.5)
        slow = Slow(port, "/delay/1", 8)  # one-second requests in flight at the handover
        time.sleep(0.2)
        new = start(concurrency=2, wait_ready=False)
        assert _wait_exit(old) == 0, old.log_text()[-3000:]
        time.sleep(0.3)  # the new proxy alone serves a while
    finally:
        load.finish()
        if slow is not None:
            slow.join(15)
    result = load.result
    assert result.ok > 500, result
    assert result.failures == [], result.failures[:10]
    assert load.connects > 50 and load.connect_failures == [], load.connect_failures[:10]
    assert [r[0] for r in slow.results] == [200] * 8, slow.results
    # the new proxy serves the handed-over sockets; its admin answers on the same port
    assert get(port, "/after") == (200, "v1 /after")
    assert new.admin("/ready") == (200, "LIVE\n")
    dump = new.config_dump()
    assert all(w["pid"] for w in dump["workers"])
    assert "hot_restart_complete" in _events(new)
    old_events = _events(old)
    assert "hot_restart_draining" in old_events and old_events[-1] == "stopped"
    inherited = next(r for r in new.log_records() if r.get("event") == "hot_restart_inherited")
    assert inherited["sockets"] == 2 and inherited["admin"] is True
    # and the new proxy can be replaced in turn (it listens on the path now)
    newer = start(concurrency=1, wait_ready=False)
    assert _wait_exit(new) == 0
    newer.wait_ready()
    assert get(port, "/third") == (200, "v1 /third")
    # one worker serves both sockets the two before it handed over: no queue left unserved
    added = [r for r in newer.log_records() if r.get("event") == "listener_added"]
    assert [r["inherited_sockets"] for r in added] == [2], added


def test_hot_restart_to_a_config_with_a_listener_added_and_one_removed(mesh) -> None:
    start, port, backend_port, _ = mesh
    removed, added = free_port(), free_port()
    old = start(concurrency=1, config_text=mesh_config(port, backend_port, backend_port,
                                                       extra_gateway_ports=(removed,)))
    assert get(removed, "/r")[0] == 200
    # more workers than sockets handed over: the second binds its own beside the inherited one
    new = start(concurrency=2, config_text=mesh_config(port, backend_port, backend_port,
                                                       extra_gateway_ports=(added,)), wait_ready=False)
    assert _wait_exit(old) == 0
    new.wait_ready()
    assert get(port, "/kept") == (200, "v1 /kept")
    assert get(added, "/added") == (200, "v1 /added")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", removed), timeout=2).close()
    # the removed listener's inherited socket was closed by the worker given it; the kept listener
    # serves the inherited socket in worker 0 and a socket of its own in worker 1
    assert "inherited_socket_closed" in _events(new)
    kept = [r for r in new.log_records() if r.get("event") == "listener_added" and r["address"].endswith(f":{port}")]
    assert sorted((r["worker"], r["inherited_sockets"]) for r in kept) == [(0, 1), (1, 0)]


def test_a_hot_restart_socket_nobody_serves_starts_normally(mesh, tmp_path: Path) -> None:
    start, port, _, path = mesh
    # a path a killed proxy left behind: a Unix socket file with no listener
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    proxy = start(concurrency=1)
    assert get(port, "/x") == (200, "v1 /x")
    assert "hot_restart_none" in _events(proxy)
    assert "hot_restart_listening" in _events(proxy)


def test_an_incompatible_protocol_version_is_refused_and_the_running_proxy_serves_on(mesh) -> None:
    start, port, _, path = mesh
    proxy = start(concurrency=1)
    for garbage in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff"):  # undecodable, oversized: ignored
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.settimeout(5)
            bad.connect(path)
            bad.sendall(garbage)
            assert bad.recv(100) == b""  # closed without handing anything over
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    body = msgspec.msgpack.encode(hot_restart.Hello(protocol_version=hot_restart.PROTOCOL_VERSION + 1, pid=1))
    client.sendall(len(body).to_bytes(4, "big") + body)
    reply = b""
    while True:
        data = client.recv(4096)
        if not data:
            break
        reply += data
    client.close()
    refused = msgspec.msgpack.decode(reply[4:], type=hot_restart.Message)
    assert isinstance(refused, hot_restart.Refused)
    assert f"version {hot_restart.PROTOCOL_VERSION + 1} is not supported" in refused.reason
    assert get(port, "/still") == (200, "v1 /still")
    assert proxy.admin("/ready")[0] == 200


def test_inherited_sockets_are_spread_so_every_one_is_served() -> None:
    def info(port: int) -> ListenerSocket:
        return ListenerSocket("l", "HTTP", "127.0.0.1", port)

    handed = [(info(80), "a"), (info(80), "b"), (info(80), "c"), (info(81), "d")]
    assert hot_restart.assign_to_workers(handed, 2) == [[handed[0], handed[2], handed[3]], [handed[1]]]
    assert hot_restart.assign_to_workers(handed, 4) == [[handed[0], handed[3]], [handed[1]], [handed[2]], []]
    assert hot_restart.check_hello(hot_restart.Hello(hot_restart.PROTOCOL_VERSION, 1), draining=False) is None
    assert "draining" in hot_restart.check_hello(hot_restart.Hello(hot_restart.PROTOCOL_VERSION, 1), draining=True).reason


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_of_a_killed_supervisor_serve_on_until_the_next_proxy_takes_over(mesh) -> None:
    start, port, _, path = mesh
    old = start(concurrency=2)
    worker_pids = [w["pid"] for w in old.config_dump()["workers"]]
    load = Load(port)
    try:
        time.sleep(0.5)
        old.proc.kill()  # kill -9 of the supervisor: its workers are orphaned, not gone
        old.proc.wait(timeout=5)
        time.sleep(0.5)  # no supervisor at all for a while: the orphans serve
        assert all(_alive(pid) for pid in worker_pids)
        new = start(concurrency=2, wait_ready=False)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in worker_pids), old.log_text()[-3000:]
        time.sleep(0.3)
    finally:
        load.finish()
        for pid in worker_pids:  # never leave an orphan behind, whatever failed above
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert load.result.ok > 300, load.result
    assert load.result.failures == [], load.result.failures[:10]
    assert load.connect_failures == [], load.connect_failures[:10]
    new.wait_ready()
    assert get(port, "/after") == (200, "v1 /after")
    events = _events(old)  # the orphans log to the stream the supervisor had
    assert events.count("worker_orphaned") == 2 and events.count("hot_restart_draining") == 2
    assert "hot_restart_from_orphans" in _events(new)
    assert not list(Path(path).parent.glob("*.orphan-*"))  # each orphan removed its path


class Echo:
    """A TCP echo server on 127.0.0.1 (a thread per connection, bounded by the test's connections)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _tcp_config(http_port: int, tcp_port: int, backend_port: int, echo_port: int) -> str:
    return mesh_config(http_port, backend_port, backend_port) + f"""---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tcp-gw, namespace: test}}
spec:
  servers:
  - port: {{number: {tcp_port}, name: tcp, protocol: TCP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: test}}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: test}}
spec:
  hosts: ["*"]
  gateways: [tcp-gw]
  tcp:
  - route: [{{destination: {{host: echo, port: {{number: 9000}}}}}}]
"""


def _echoes(conn: socket.socket, payload: bytes) -> bool:
    conn.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == payload


def test_a_tcp_listener_is_handed_over_and_its_open_connections_finish_in_the_old_proxy(mesh) -> None:
    start, port, backend_port, _ = mesh
    echo = Echo()
    tcp_port = free_port()
    config = _tcp_config(port, tcp_port, backend_port, echo.port)
    old = start(concurrency=2, config_text=config)
    try:
        before = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
        assert _echoes(before, b"one")
        new = start(concurrency=2, config_text=config, wait_ready=False)
        new.wait_for(lambda: "hot_restart_complete" in _events(new), "the hot restart", timeout_s=20)
        # every old worker stopped accepting on both listeners: what connects now is the new proxy's
        old.wait_for(lambda: _events(old).count("listener_closed") == 4, "the old listeners to close")
        after = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
        assert _echoes(after, b"two")  # accepted by the new proxy from the handed-over sockets
        assert _echoes(before, b"three")  # the old proxy's connection goes on while it drains
        assert old.proc.poll() is None
        before.close()
        assert _wait_exit(old) == 0  # nothing open any more: it exits before the drain deadline
        assert _echoes(after, b"four")
        after.close()
        listeners = [r for r in new.log_records() if r.get("event") == "listener_added"]
        assert sum(r["inherited_sockets"] for r in listeners) == 4  # HTTP and TCP, one per old worker each
    finally:
        echo.sock.close()


def _total(proxy: Proxy, name: str) -> float:
    return sum(proxy.stats(name).values())


def test_counters_survive_hot_restarts_counted_once_gauges_do_not(mesh) -> None:
    """Requests counted by a proxy (including those its drain finished after the handover) are in the
    next proxy's /stats/prometheus once the old one exited, Istio's istio_requests_total included,
    and through a second restart too; each counted once. A gauge starts afresh."""
    start, port, _, _ = mesh
    old = start(concurrency=2)
    for i in range(10):
        assert get(port, f"/before/{i}")[0] == 200
    slow = Slow(port, "/delay/1", 4)  # finish in the old proxy after the handover
    time.sleep(0.3)
    new = start(concurrency=2, wait_ready=False)
    new.wait_ready(60)  # generous: a loaded machine starts Python processes slowly
    # while the old proxy still drains, the new one already shows its counts: never a drop to zero
    new.wait_for(lambda: _total(new, "istio_requests_total") >= 10, "the draining proxy's counts")
    slow.join(15)
    assert [r[0] for r in slow.results] == [200] * 4, slow.results
    assert _wait_exit(old, 60) == 0, old.log_text()[-3000:]
    new.wait_for(lambda: "hot_restart_counters_carried" in _events(new), "the old proxy's final counters", 30)
    carried = next(r for r in new.log_records() if r.get("event") == "hot_restart_counters_carried")
    assert carried["final"] is True
    assert _total(new, "triomesh_downstream_rq_total") == 14
    assert _total(new, "istio_requests_total") == 14
    assert _total(new, "istio_request_duration_milliseconds_count") == 14  # histograms travel too
    assert _total(new, "triomesh_draining") == 0  # the old proxy's gauge said 1 when it exited
    for i in range(5):
        assert get(port, f"/after/{i}")[0] == 200
    assert _total(new, "istio_requests_total") == 19
    newer = start(concurrency=1, wait_ready=False)
    assert _wait_exit(new, 60) == 0, new.log_text()[-3000:]
    newer.wait_for(lambda: "hot_restart_counters_carried" in _events(newer), "the counters of both before", 30)
    assert _total(newer, "triomesh_downstream_rq_total") == 19
    assert _total(newer, "istio_requests_total") == 19
