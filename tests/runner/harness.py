"""The real `triomesh proxy` as a subprocess, real backends, and small clients, for the runner tests.

Every process here is started by the test, tracked by PID, and stopped by PID. Ports come from the
kernel (bind to port 0, read it, release it). Every client loop is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW_RESPONSE_S = 2.0
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering "<name> <path>" to every GET."""

    def __init__(self, name: str) -> None:
        body_name = name.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.startswith("/slow"):  # a request still in flight while the test reloads
                    time.sleep(SLOW_RESPONSE_S)
                elif self.path.startswith("/delay/"):  # /delay/SECONDS: answers after that long
                    time.sleep(float(self.path.split("/")[2]))
                body = body_name + b" " + self.path.encode()
                # head and body in one write: two small writes meet Nagle + delayed ACK (40 ms stalls)
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            # socketserver's default listen backlog is 5: a burst of a few hundred proxy connections
            # overflowed it, and a connection the kernel then dropped the handshake of never got an
            # answer (a request of the proxy's waiting forever on a backend that never saw it)
            request_queue_size = 4096

        self.name = name
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mesh_config(gateway_port: int, v1_port: int, v2_port: int, *, weights: tuple[int, int] = (80, 20),
                extra_routes: str = "", extra_gateway_ports: tuple[int, ...] = ()) -> str:
    """A Gateway on `gateway_port`, a `backend` service with v1/v2 endpoints and subsets, and a
    VirtualService: `extra_routes` (indented http route items) first, then the weighted split."""
    servers = "".join(
        f"  - port: {{number: {p}, name: http-{p}, protocol: HTTP}}\n    hosts: [\"*\"]\n"
        for p in (gateway_port, *extra_gateway_ports))
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: gw, namespace: test}}
        spec:
          servers:
        """) + servers + textwrap.dedent(f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: backend, namespace: test}}
        spec:
          hosts: [backend]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {v1_port}}}, labels: {{version: v1}}}}
          - {{address: 127.0.0.1, ports: {{http: {v2_port}}}, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: backend, namespace: test}}
        spec:
          host: backend
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: backend, namespace: test}}
        spec:
          hosts: ["*"]
          gateways: [gw]
          http:
        """) + extra_routes + (
        "  - route:\n"
        f"    - {{destination: {{host: backend, subset: v1}}, weight: {weights[0]}}}\n"
        f"    - {{destination: {{host: backend, subset: v2}}, weight: {weights[1]}}}\n")


def route_to(prefix: str, subset: str) -> str:
    return (f"  - match: [{{uri: {{prefix: {prefix}}}}}]\n"
            f"    route: [{{destination: {{host: backend, subset: {subset}}}}}]\n")


def replace_keeping_fingerprint(path: Path, text: str) -> None:
    """Write `text` with the old file's size and mtime (padded with a YAML comment), so only an
    explicit SIGHUP, never the file poller, can notice the change."""
    st = path.stat()
    data = text.encode()
    pad = st.st_size - len(data)
    assert pad >= 3, "new config must be shorter than the old one"
    data += b"#" + b" " * (pad - 2) + b"\n"
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@dataclass
class Proxy:
    config: Path | None  # None: config only from a control plane (pass --controlplane in extra_args)
    workdir: Path
    concurrency: int = 2
    access_log: str = "json"
    log_level: str = "info"
    log_format: str = "json"
    admin_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    nofile: int | None = None  # RLIMIT_NOFILE of the proxy (supervisor and workers), to exhaust it on purpose
    proc: subprocess.Popen | None = None

    def start(self, *, wait_ready: bool = True) -> Proxy:
        self.stderr_path = self.workdir / f"triomesh-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "proxy.cli", "proxy", *(["--config", str(self.config)] if self.config else []),
               "--concurrency", str(self.concurrency), "--bind-address", "127.0.0.1",
               "--admin-address", f"127.0.0.1:{self.admin_port}", "--access-log", self.access_log,
               "--log-level", self.log_level, "--log-format", self.log_format, *self.extra_args]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        nofile = self.nofile
        limit_fds = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "wb"), preexec_fn=limit_fds)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.admin("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"proxy not ready in {timeout_s}s:\n{self.log_text()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError("proxy did not stop within 15 s of SIGTERM")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def config_dump(self) -> dict:
        status, text = self.admin("/config_dump")
        assert status == 200, text
        return json.loads(text)

    def stats(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        status, text = self.admin("/stats/prometheus")
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            m = SAMPLE.match(line)
            if m and m["name"] == name:
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m["labels"] or "")))
                out[labels] = float(m["value"])
        return out

    def wait_for(self, predicate, what: str, timeout_s: float = 15.0):
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_text()[-4000:]}")
            time.sleep(0.1)

    def wait_version(self, version: str, timeout_s: float = 15.0) -> dict:
        """Until the supervisor and every worker serve `version`."""
        def done():
            dump = self.config_dump()
            if dump["version"] == version and all(w["version"] == version for w in dump["workers"]):
                return dump
            return None

        return self.wait_for(done, f"version {version} on every worker", timeout_s)

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by a crash; the tests look at whole ones
        return records


def triomesh(*argv: str, stdin: bytes | None = None, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """One `triomesh` CLI run (text output)."""
    return subprocess.run([sys.executable, "-m", "proxy.cli", *argv], cwd=REPO_ROOT, input=stdin, capture_output=True,
                          timeout=timeout_s, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))


@dataclass
class ControlPlane:
    """`triomesh controlplane` as a subprocess on 127.0.0.1 (port 0 unless given; the bound port is
    read from --port-file). Short heartbeats, grace and debounce so tests run fast."""

    config: Path
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    # e.g. ["--ca-dir", DIR] for TLS; without --ca-dir the control plane runs with --insecure-plaintext
    extra_args: list[str] = field(default_factory=list)
    # how long a disconnected proxy stays registered: short for the tests of expiry; a test that
    # restarts a proxy and expects its entry resumed needs it longer than a loaded machine's stop + start
    grace_period_s: float = 2.0

    def start(self) -> ControlPlane:
        port_file = self.workdir / f"cp-{time.monotonic_ns()}.port"
        self.log_path = self.workdir / f"controlplane-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "proxy.cli", "controlplane", "--config", str(self.config),
               "--listen", f"127.0.0.1:{self.port}", "--port-file", str(port_file),
               "--heartbeat-interval", "1", "--grace-period", str(self.grace_period_s), "--debounce", "0.05", "--poll-interval", "0.2",
               *(self.extra_args if "--ca-dir" in self.extra_args else ["--insecure-plaintext", *self.extra_args])]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"))
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"control plane did not start ({self.proc.poll()}):\n{self.log_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError("control plane did not stop within 10 s of SIGTERM")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]

    def cli(self, *argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """`triomesh SUBCOMMAND ARGS --controlplane ADDRESS`."""
        return triomesh(*argv, "--controlplane", self.address, stdin=stdin)

    def status(self) -> dict:
        r = self.cli("proxy-status", "-o", "json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def get(port: int, path: str, *, timeout_s: float = 5.0) -> tuple[int, str]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bodies: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, body)


def keepalive_load(port: int, path: str, *, connections: int, total: int, max_s: float,
                   stop: threading.Event | None = None) -> LoadResult:
    """`connections` threads, each one keep-alive connection, `total` requests between them at most,
    for at most `max_s` seconds. Any exception or non-200 is a failure (never retried)."""
    result = LoadResult()
    lock = threading.Lock()
    budget = [total]
    deadline = time.monotonic() + max_s

    def take() -> bool:
        with lock:
            if budget[0] <= 0 or time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return False
            budget[0] -= 1
            return True

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while take():
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    body = resp.read().decode()
                except Exception as e:  # noqa: BLE001 - every kind of failure counts
                    with lock:
                        result.failures.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    continue
                with lock:
                    if resp.status == 200:
                        result.ok += 1
                        result.bodies.append((time.monotonic(), body))
                    else:
                        result.failures.append(f"status {resp.status}: {body[:200]}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_s + 30)
    return result
