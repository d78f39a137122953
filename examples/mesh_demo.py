"""The mesh in network namespaces: customer -> preference -> recommendation v1/v2, each app in its own
namespace beside its own transparent sidecar, apps unchanged and calling each other by name.

    sudo .venv/bin/python -m examples.mesh_demo [--requests 100]

What it builds (all torn down at the end, also on failure or ^C):
- a lab (proxy/l4/capture/lab.py): one namespace per node on a private bridge, 198.18.0.10+i,
  hosts files naming every node plus `recommendation`, whose address is the ServiceEntry's virtual
  IP (no node holds it: capture diverts connections to it before they leave the node);
- in each app node: the capture rules (`triomesh capture install`: outbound to :15001, inbound to
  :15006, uid and gid 1337 excluded), `triomesh proxy --config examples/mesh` running with gid 1337,
  and the app listening on 0.0.0.0:8080 and calling `http://preference:8080/` or
  `http://recommendation:8080/` with no proxy settings at all;
- a `client` node (no sidecar) that sends the requests, and an `outside` node (no sidecar, no
  ServiceEntry) that runs a plain server: reaching it from inside the mesh must fail, because the
  Sidecar says outboundTrafficPolicy REGISTRY_ONLY.

`run()` sends the requests and reports the split, the header-routed requests, the egress refusals
and the sidecars' stats; `MeshDemo` is the same as a context manager for tests.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from proxy.l4.capture import iptables
from proxy.l4.capture.lab import Lab, LabError, lab_up
from proxy.l4.capture.rules import CaptureOptions

REPO = Path(__file__).resolve().parents[1]
MESH_CONFIG = REPO / "examples" / "mesh"
# istio-proxy's uid/gid, whose sockets the capture rules never capture. The sidecar runs with gid 1337
# (the rules exclude the gid too, istio-iptables -g): its uid stays the caller's, because an
# interpreter under a private home (pyenv in /root) cannot be executed by another uid.
PROXY_GID = 1337
APP_PORT = 8080
ADMIN_PORT = 15000
# lab order fixes the addresses: 198.18.0.10 + index, as examples/mesh/services.yaml expects
NODES = ("customer", "preference", "recommendation-v1", "recommendation-v2", "client", "outside")
EXPECTED_ADDRESSES = {"customer": "198.18.0.10", "preference": "198.18.0.11", "recommendation-v1": "198.18.0.12",
                      "recommendation-v2": "198.18.0.13"}
RECOMMENDATION_VIP = "198.18.0.200"
MESH_APPS = {
    "customer": ["examples.apps.customer"],
    "preference": ["examples.apps.preference"],
    "recommendation-v1": ["examples.apps.recommendation", "--version", "v1", "--instance-id", "recommendation-v1"],
    "recommendation-v2": ["examples.apps.recommendation", "--version", "v2", "--instance-id", "recommendation-v2"],
}
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
_VERSION = re.compile(r"recommendation (v\d+) from")


class DemoError(Exception):
    pass


class NamespacesUnavailable(DemoError):
    """Root, but this machine will not make network namespaces or nat rules (an unprivileged
    container, no iptables): `make demo` falls back to the loopback demo."""


# exit code of main() for NamespacesUnavailable (and for not being root)
EXIT_NO_NAMESPACES = 3


@dataclass
class MeshDemo:
    """Lab, capture, sidecars and apps; `with MeshDemo() as mesh:` always tears everything down."""

    config_dir: Path = MESH_CONFIG
    access_log: str = "json"
    lab: Lab | None = None
    log_dir: Path | None = None  # the processes' output; a fresh temporary directory when None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    captured: list[str] = field(default_factory=list)

    # ---- lifecycle

    def up(self) -> "MeshDemo":
        if os.geteuid() != 0:
            raise NamespacesUnavailable("the namespace mesh needs root (network namespaces, iptables)")
        if not iptables.available(4):
            raise NamespacesUnavailable("iptables-restore/iptables-save not found (Debian package iptables)")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="triomesh-mesh-"))
        try:
            self.lab = lab_up(NODES, subnet_v6=None, extra_hosts={"recommendation": RECOMMENDATION_VIP})
        except (OSError, LabError) as exc:
            raise NamespacesUnavailable(f"cannot create network namespaces: {exc}") from exc
        for name, address in EXPECTED_ADDRESSES.items():
            if self.lab.node(name).ipv4 != address:
                raise DemoError(f"lab gave {name} {self.lab.node(name).ipv4}, the config expects {address}")
        options = CaptureOptions(proxy_uid=str(PROXY_GID), proxy_gid=str(PROXY_GID))
        for name in MESH_APPS:
            try:
                iptables.install(options, netns=self.lab.node(name).netns)
            except iptables.CaptureError as exc:
                raise NamespacesUnavailable(f"cannot install the capture rules: {exc}") from exc
            self.captured.append(name)
        for name in MESH_APPS:
            self._spawn(f"sidecar-{name}", name, PROXY_GID, self._proxy_argv())
        for name, app in MESH_APPS.items():
            self._spawn(name, name, None, [sys.executable, "-m", app[0], "--bind", "0.0.0.0", "--port", str(APP_PORT), *app[1:]])
        self._spawn("outside", "outside", None, [sys.executable, "-m", "examples.apps.recommendation", "--bind", "0.0.0.0",
                                                    "--port", str(APP_PORT), "--version", "outside", "--instance-id", "outside"])
        self.wait_ready()
        return self

    def _proxy_argv(self) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", "proxy", "--config", str(self.config_dir), "--concurrency", "1",
                "--access-log", self.access_log, "--log-format", "json",
                "--admin-address", f"127.0.0.1:{ADMIN_PORT}"]

    def _spawn(self, label: str, node: str, gid: int | None, argv: list[str]) -> None:
        assert self.lab is not None
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # no http_proxy: capture does it
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if gid is not None:
            argv = ["setpriv", f"--regid={gid}", "--clear-groups", *argv]
        full = self.lab.argv(node, argv)
        assert self.log_dir is not None
        log = open(self.log_dir / f"{label}.log", "wb")
        try:
            # own process group: teardown signals the whole group (a proxy's workers included)
            self.procs[label] = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                                 start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.lab is not None
        deadline = time.monotonic() + timeout_s
        pending = {f"sidecar-{n}" for n in MESH_APPS} | set(MESH_APPS) | {"outside"}
        while pending:
            for label in sorted(pending):
                proc = self.procs[label]
                if proc.poll() is not None:
                    raise DemoError(f"{label} exited with {proc.returncode}:\n{self.log_tail(label)}")
                if label.startswith("sidecar-"):
                    node = label.removeprefix("sidecar-")
                    ok = self._ready(node)
                else:
                    ok = self._accepts(label, "127.0.0.1", APP_PORT)
                if ok:
                    pending.discard(label)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"not ready within {timeout_s}s: {', '.join(sorted(pending))}\n"
                                + "\n".join(self.log_tail(p) for p in sorted(pending)))
            time.sleep(0.1)

    def _ready(self, node: str) -> bool:
        try:
            status, _ = self.get(node, "127.0.0.1", ADMIN_PORT, "/ready", timeout_s=1.0)
        except OSError:
            return False
        return status == 200

    def _accepts(self, node: str, ip: str, port: int) -> bool:
        assert self.lab is not None
        with self.lab.socket(node) as sock:
            sock.settimeout(1.0)
            return sock.connect_ex((ip, port)) == 0

    def log_tail(self, label: str, lines: int = 20) -> str:
        try:
            text = (Path(self.log_dir or ".") / f"{label}.log").read_text(errors="replace")
        except OSError:
            return f"({label}: no log)"
        return f"--- {label} ---\n" + "\n".join(text.splitlines()[-lines:])

    def down(self) -> None:
        """Stop every process we started (by handle), remove capture rules, remove the namespaces."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        if self.lab is not None:
            for name in self.captured:
                try:
                    iptables.remove(netns=self.lab.node(name).netns)
                except iptables.CaptureError:
                    pass  # the namespace goes away next, and its rules with it
            self.lab.down()
        self.captured.clear()

    def __enter__(self) -> "MeshDemo":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- traffic

    def get(self, node: str, ip: str, port: int, path: str = "/", headers: dict[str, str] | None = None, *,
            timeout_s: float = REQUEST_TIMEOUT_S, conn: http.client.HTTPConnection | None = None) -> tuple[int, str]:
        """One GET from inside `node`'s namespace (a socket made there, owned by root: the node's
        capture rules apply to it as to any app)."""
        own = conn is None
        if conn is None:
            conn = self.connect(node, ip, port, timeout_s)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            if own:
                conn.close()

    def connect(self, node: str, ip: str, port: int, timeout_s: float = REQUEST_TIMEOUT_S) -> http.client.HTTPConnection:
        assert self.lab is not None
        sock = self.lab.socket(node)
        sock.settimeout(timeout_s)
        try:
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
        conn.sock = sock
        return conn

    def customer_requests(self, count: int, headers: dict[str, str] | None = None) -> list[tuple[int, str]]:
        """`count` requests from the client node to http://customer:8080/ over one keep-alive connection."""
        assert self.lab is not None
        ip = self.lab.node("customer").ipv4
        conn = self.connect("client", ip, APP_PORT)
        out = []
        try:
            for _ in range(count):
                if conn.sock is None:  # the last answer closed it: reconnect from the client node
                    conn = self.connect("client", ip, APP_PORT)
                out.append(self.get("client", ip, APP_PORT, "/", headers, conn=conn))
        finally:
            conn.close()
        return out

    def stats(self, node: str) -> str:
        status, text = self.get(node, "127.0.0.1", ADMIN_PORT, "/stats/prometheus")
        if status != 200:
            raise DemoError(f"{node} admin answered {status}")
        return text


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # the group we created for this child (start_new_session)
    except ProcessLookupError:
        pass


def version_counts(bodies: Iterable[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for body in bodies:
        m = _VERSION.search(body)
        counts[m.group(1) if m else "error"] += 1
    return counts


def stat_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def refused_tcp(mesh: MeshDemo, node: str, ip: str, port: int) -> bool:
    """Whether a non-HTTP connection from `node` to ip:port is refused (reset, or closed unanswered)."""
    assert mesh.lab is not None
    with mesh.lab.socket(node) as sock:
        sock.settimeout(5)
        try:
            sock.connect((ip, port))
            sock.sendall(b"\x00\x01 not http\r\n")
            return sock.recv(100) == b""
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            return True


def run(requests: int, access_log: str = "off", config_dir: Path = MESH_CONFIG, keep_logs: bool = False) -> int:
    with MeshDemo(config_dir=config_dir, access_log=access_log) as mesh:
        assert mesh.lab is not None
        print(f"lab {mesh.lab.run_id}: " + ", ".join(f"{n.name} {n.ipv4}" for n in mesh.lab.nodes.values())
              + f"; recommendation VIP {RECOMMENDATION_VIP}")
        print(f"capture rules and a sidecar (gid {PROXY_GID}) in: {', '.join(MESH_APPS)}")

        results = mesh.customer_requests(requests)
        counts = version_counts(body for _, body in results)
        ok = sum(1 for status, _ in results if status == 200)
        print(f"\n{requests} requests client -> http://customer:8080/ ({ok} answered 200):")
        print(f"  example: {results[0][1].strip()}")
        for version, n in sorted(counts.items()):
            print(f"  {version}: {n} ({100 * n / requests:.0f}%)")

        jason = mesh.customer_requests(10, {"end-user": "jason"})
        jason_counts = version_counts(body for _, body in jason)
        print(f"\n10 requests with end-user: jason (header route to v2): {dict(jason_counts)}")

        outside = mesh.lab.node("outside").ipv4
        status, body = mesh.get("customer", outside, APP_PORT, "/")
        print(f"\negress from the customer pod to http://outside:8080/ (no ServiceEntry): {status} {body.strip()}")
        tcp_refused = refused_tcp(mesh, "customer", outside, APP_PORT)
        print(f"  a non-HTTP connection there: {'reset' if tcp_refused else 'NOT refused'}")

        stats = mesh.stats("preference")
        print("\npreference's sidecar, captured connections and upstream requests:")
        for line in stats.splitlines():
            if line.startswith(("triomesh_sidecar_cx_total", "triomesh_upstream_rq_total")):
                print(f"  {line}")
        passed = (ok == requests and counts.get("error", 0) == 0 and jason_counts == {"v2": 10}
                  and status == 502 and tcp_refused)
        if passed and not keep_logs:
            print("\nresult: ok")
        else:
            print("\nresult: " + ("ok" if passed else "FAILED") + f" (logs in {mesh.log_dir})")
    if passed and not keep_logs and mesh.log_dir is not None:
        shutil.rmtree(mesh.log_dir, ignore_errors=True)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.mesh_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests for the split (default 100)")
    parser.add_argument("--access-log", choices=("off", "json", "console"), default="off",
                        help="the sidecars' access log format, written to their log files (default off)")
    parser.add_argument("--config", type=Path, default=MESH_CONFIG, help="directory of Istio resources")
    parser.add_argument("--keep-logs", action="store_true", help="keep the apps' and sidecars' logs (kept anyway on failure)")
    args = parser.parse_args(argv)
    main_pid = os.getpid()

    def terminated(signum: int, frame: object) -> None:
        # pyroute2's namespace helpers fork children that inherit this handler and are stopped with
        # SIGTERM: those must just die; only this process unwinds (MeshDemo.__exit__ tears down)
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        return run(max(1, min(args.requests, 100_000)), args.access_log, args.config, args.keep_logs)
    except NamespacesUnavailable as exc:
        print(f"mesh demo: {exc}", file=sys.stderr)
        return EXIT_NO_NAMESPACES
    except DemoError as exc:
        print(f"mesh demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
