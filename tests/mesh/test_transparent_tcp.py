"""A transparent sidecar's L4 paths in real namespaces: a TCP service reached at its VIP (sent to its
endpoint, no sniffing wait for a server-first protocol), ALLOW_ANY passthrough to an unknown
destination and its closing by a live config change to REGISTRY_ONLY, inbound passthrough to an
undeclared port from 127.0.0.6, a connection to the capture port itself refused instead of looping,
and TLS egress admitted by SNI only."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from examples.mesh_demo import stat_value
from proxy.l4.capture import iptables
from proxy.l4.capture.lab import Lab, open_lab
from proxy.l4.capture.rules import CaptureOptions

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables-restore", "setpriv")) and not os.environ.get("CI"),
        reason="needs ip (iproute2), iptables-restore (iptables) and setpriv (util-linux)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PROXY_GID = 1337
DB_VIP = "198.18.0.201"
CACHE_VIP = "198.18.0.202"

CONFIG = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: shop}}
spec:
  hosts: [db.shop.internal]
  addresses: [{DB_VIP}]
  resolution: STATIC
  ports: [{{number: 5432, name: tcp, protocol: TCP, targetPort: 15432}}]
  endpoints: [{{address: SERVER_IP}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cache, namespace: shop}}
spec:
  hosts: [cache.shop.internal]
  addresses: [{CACHE_VIP}]
  resolution: DNS
  ports: [{{number: 6379, name: redis, protocol: TCP}}]
  endpoints: [{{address: server, ports: {{redis: 9000}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: shop}}
spec:
  outboundTrafficPolicy: {{mode: ALLOW_ANY}}
  egress:
  - captureMode: IPTABLES
    hosts: ["*/*"]
"""


@contextmanager
def tcp_server(lab: Lab, node: str, port: int, banner: bytes) -> Iterator[list[str]]:
    """Accepts in a node's namespace; sends `banner` first (server-first, like SMTP/MySQL), then
    echoes one read. Yields the peer addresses it saw."""
    listener = lab.socket(node)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    listener.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            peers.append(addr[0])
            with conn:
                conn.settimeout(5)
                try:
                    conn.sendall(banner)
                    data = conn.recv(1024)
                    conn.sendall(b"echo:" + data)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield peers
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@contextmanager
def sidecar(lab: Lab, node: str, config_dir: Path, *, access_log: str = "off") -> Iterator[None]:
    """The proxy in `node`; its output (the JSON access log when `access_log="json"`) in proxy.log."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    argv = lab.argv(node, ["setpriv", f"--regid={PROXY_GID}", "--clear-groups", sys.executable, "-m", "proxy.cli",
                           "proxy", "--config", str(config_dir), "--concurrency", "1", "--access-log", access_log,
                           "--admin-address", "127.0.0.1:15000"])
    log = open(config_dir / "proxy.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while admin_get(lab, node, "/ready") != 200:
            assert proc.poll() is None, (config_dir / "proxy.log").read_text()
            assert time.monotonic() < deadline, (config_dir / "proxy.log").read_text()
            time.sleep(0.1)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of our own child (its workers included)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def admin_get(lab: Lab, node: str, path: str) -> int | str:
    """GET on the sidecar's admin listener (127.0.0.1:15000 inside the node): the status for
    /ready, the body for /stats."""
    sock = lab.socket(node)
    sock.settimeout(2)
    try:
        sock.connect(("127.0.0.1", 15000))
    except OSError:
        sock.close()
        return 0
    conn = http.client.HTTPConnection("127.0.0.1", 15000, timeout=2)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
    except OSError:
        return 0
    finally:
        conn.close()
    return body if path.startswith("/stats") else resp.status


def exchange(lab: Lab, node: str, ip: str, port: int) -> tuple[bytes, bytes]:
    """Connect from inside `node` (a root-owned socket: captured), read the banner without sending
    anything first, then send and read the echo."""
    with lab.socket(node) as sock:
        sock.settimeout(5)
        sock.connect((ip, port))
        banner = sock.recv(1024)
        sock.sendall(b"ping")
        return banner, sock.recv(1024)


def refused(lab: Lab, node: str, ip: str, port: int) -> bool:
    """Whether a connection from `node` is reset or closed before the server's banner arrives."""
    with lab.socket(node) as sock:
        sock.settimeout(5)
        try:
            sock.connect((ip, port))
            sock.sendall(b"ping")
            return sock.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_tcp_service_passthrough_inbound_and_no_loop(tmp_path: Path) -> None:
    with open_lab(["app", "server"]) as lab:
        app, server = lab.node("app"), lab.node("server")
        (tmp_path / "config.yaml").write_text(CONFIG.replace("SERVER_IP", server.ipv4))
        iptables.install(CaptureOptions(proxy_uid=str(PROXY_GID), proxy_gid=str(PROXY_GID)), netns=app.netns)
        with tcp_server(lab, "server", 15432, b"db ready\n") as db_peers, \
                tcp_server(lab, "server", 9000, b"other\n") as other_peers, \
                tcp_server(lab, "app", 7000, b"app\n") as app_peers, \
                sidecar(lab, "app", tmp_path, access_log="json"):
            # the VIP and service port are translated to the endpoint and its target port; the banner
            # arrives although the client never spoke first (a TCP service is not sniffed)
            assert exchange(lab, "app", DB_VIP, 5432) == (b"db ready\n", b"echo:ping")
            assert db_peers == [app.ipv4]
            # ALLOW_ANY: an address no ServiceEntry knows is passed through to where it was going
            assert exchange(lab, "app", server.ipv4, 9000) == (b"other\n", b"echo:ping")
            assert other_peers == [app.ipv4]
            # a DNS endpoint ("server", from the namespace's hosts file) is resolved when connecting
            assert exchange(lab, "app", CACHE_VIP, 6379) == (b"other\n", b"echo:ping")
            assert other_peers == [app.ipv4, app.ipv4]
            # inbound to a port no Sidecar ingress declares: to the app from 127.0.0.6
            assert exchange(lab, "server", app.ipv4, 7000) == (b"app\n", b"echo:ping")
            assert app_peers == ["127.0.0.6"]
            # dialling the capture port itself must not loop back into the proxy
            with lab.socket("app") as sock:
                sock.settimeout(5)
                sock.connect(("127.0.0.1", 15001))
                assert sock.recv(100) == b""

            stats = admin_get(lab, "app", "/stats/prometheus")
            assert isinstance(stats, str)
            sent = len(b"ping")
            received = len(b"db ready\n") + len(b"echo:ping")
            assert stat_value(stats, "triomesh_tcp_bytes_total", cluster="outbound|5432||db.shop.internal",
                              direction="downstream_to_upstream") == sent
            assert stat_value(stats, "triomesh_tcp_bytes_total", cluster="outbound|5432||db.shop.internal",
                              direction="upstream_to_downstream") == received
            assert stat_value(stats, "triomesh_tcp_downstream_cx_total", cluster="PassthroughCluster") == 1
            assert stat_value(stats, "triomesh_tcp_downstream_cx_total", cluster="InboundPassthroughCluster") == 1
            assert stat_value(stats, "triomesh_sidecar_cx_total", listener="virtualOutbound", action="not_redirected") == 1
            # the sidecar's own upstream connections were not captured: four captured, four served
            assert stat_value(stats, "triomesh_sidecar_cx_total", action="tcp") == 4
            # each connection has its access-log line, the passthrough ones as Envoy's
            # PassthroughCluster/InboundPassthroughCluster lines (upstream: where it was going)
            tcp_lines = {}
            deadline = time.monotonic() + 10
            while len(tcp_lines) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)  # a line is written when the proxy sees the connection close
                records = (json.loads(line) for line in (tmp_path / "proxy.log").read_text().splitlines()
                           if line.startswith("{"))
                tcp_lines = {(r["cluster"], r["upstream_host"]): r for r in records if r.get("protocol") == "tcp"}
            outbound = tcp_lines[("PassthroughCluster", f"{server.ipv4}:9000")]
            assert (outbound["bytes_received"], outbound["bytes_sent"]) == (sent, len(b"other\n") + len(b"echo:ping"))
            assert outbound["downstream_local_address"] == f"{server.ipv4}:9000"
            inbound = tcp_lines[("InboundPassthroughCluster", f"{app.ipv4}:7000")]
            assert (inbound["bytes_received"], inbound["bytes_sent"]) == (sent, len(b"app\n") + len(b"echo:ping"))
            assert inbound["response_flags"] == "-"
            assert ("outbound|5432||db.shop.internal", f"{server.ipv4}:15432") in tcp_lines, tcp_lines

            # a config change to REGISTRY_ONLY closes that egress without a restart (the supervisor
            # polls the files every second); the registered service keeps working
            (tmp_path / "config.yaml").write_text(
                CONFIG.replace("SERVER_IP", server.ipv4).replace("ALLOW_ANY", "REGISTRY_ONLY"))
            deadline = time.monotonic() + 15
            while not refused(lab, "app", server.ipv4, 9000):
                assert time.monotonic() < deadline, "still passed through 15 s after the config change"
                time.sleep(0.2)
            assert exchange(lab, "app", DB_VIP, 5432) == (b"db ready\n", b"echo:ping")


TLS_CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: allowed, namespace: shop}
spec:
  hosts: ["*.allowed.test"]
  resolution: NONE
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  egress:
  - captureMode: IPTABLES
    hosts: ["*/*"]
"""


@contextmanager
def tls_server(lab: Lab, node: str, port: int, ca: trustme.CA) -> Iterator[list[str]]:
    """A TLS server (cert for api.allowed.test and evil.test) answering b"hello tls". Yields the SNI
    names of the handshakes it completed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.allowed.test", "evil.test").configure_cert(ctx)
    seen: list[str] = []
    ctx.sni_callback = lambda sslobj, name, _ctx: seen.append(name) and None
    listener = lab.socket(node)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello tls")
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def tls_get(lab: Lab, node: str, ip: str, sni: str, ca: trustme.CA) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with lab.socket(node) as sock:
        sock.settimeout(5)
        sock.connect((ip, 443))
        with ctx.wrap_socket(sock, server_hostname=sni) as tls:
            return tls.recv(100)


def test_tls_egress_allowed_by_sni_only(tmp_path: Path) -> None:
    ca = trustme.CA()
    with open_lab(["app", "server"]) as lab:
        app, server = lab.node("app"), lab.node("server")
        (tmp_path / "config.yaml").write_text(TLS_CONFIG)
        iptables.install(CaptureOptions(proxy_uid=str(PROXY_GID), proxy_gid=str(PROXY_GID)), netns=app.netns)
        with tls_server(lab, "server", 443, ca) as handshakes, sidecar(lab, "app", tmp_path):
            # TLS passes through untouched (the client checks the server's own certificate) because
            # the SNI matches the ServiceEntry host *.allowed.test
            assert tls_get(lab, "app", server.ipv4, "api.allowed.test", ca) == b"hello tls"
            # the same server under a name no ServiceEntry has: reset before any handshake
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                tls_get(lab, "app", server.ipv4, "evil.test", ca)
            assert handshakes == ["api.allowed.test"]
            stats = admin_get(lab, "app", "/stats/prometheus")
            assert isinstance(stats, str)
            assert stat_value(stats, "triomesh_tcp_downstream_cx_total", cluster="outbound|443||*.allowed.test") == 1
            assert stat_value(stats, "triomesh_sidecar_outbound_refused_total", protocol="tcp") == 1
