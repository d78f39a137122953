"""The mesh in network namespaces: customer -> preference -> recommendation v1/v2, each app in its own
namespace beside its own transparent sidecar, apps unchanged and calling each other by name.

    sudo .venv/bin/python -m examples.mesh_demo [--requests 100] [--plaintext]

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

The command runs the secure mesh (`MeshDemo(secure=True)`; `--plaintext` turns it off), the mesh as
Istio runs it: a `controlplane` node runs `triomesh controlplane` (the mesh's CA, TLS, one bootstrap
token per service account), every sidecar gets its config from there, registers its workload (address, labels, service account) and holds a workload certificate for
spiffe://cluster.local/ns/tutorial/sa/<service account>; `triomesh apply` then makes mutual TLS
STRICT mesh-wide (examples/security/strict-mtls.yaml), so sidecars talk to each other over mutual TLS
(auto mTLS) and refuse plaintext. The WorkloadEntries of examples/mesh/workloads.yaml are left out:
the registrations replace them. With `--plaintext` every sidecar reads examples/mesh itself.

`run()` sends the requests and reports the split, the header-routed requests, the egress refusals
and the sidecars' stats; `MeshDemo` is the same as a context manager for tests.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import shutil
import signal
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
# lab order fixes the addresses: 198.18.0.10 + index, as examples/mesh/workloads.yaml expects
NODES = ("customer", "preference", "recommendation-v1", "recommendation-v2", "client", "outside")
EXPECTED_ADDRESSES = {"customer": "198.18.0.10", "preference": "198.18.0.11", "recommendation-v1": "198.18.0.12",
                      "recommendation-v2": "198.18.0.13"}
RECOMMENDATION_VIP = "198.18.0.200"
# the secure mesh: the control plane's own node (no sidecar, no capture), after the others: 198.18.0.16
CONTROLPLANE_NODE = "controlplane"
CONTROLPLANE_PORT = 15010
SECURITY_DIR = REPO / "examples" / "security"
STRICT_MTLS = SECURITY_DIR / "strict-mtls.yaml"
# the secure mesh: what each sidecar registers (node id, also its workload name in metrics), its service
# account (its SPIFFE ID) and labels: what examples/mesh/workloads.yaml says in the plaintext mesh
@dataclass(frozen=True)
class Workload:
    node_id: str
    service_account: str
    labels: dict[str, str]


WORKLOADS = {
    "customer": Workload("customer-v1", "customer", {"app": "customer", "version": "v1"}),
    "preference": Workload("preference-v1", "preference", {"app": "preference", "version": "v1"}),
    "recommendation-v1": Workload("recommendation-v1", "recommendation", {"app": "recommendation", "version": "v1"}),
    "recommendation-v2": Workload("recommendation-v2", "recommendation", {"app": "recommendation", "version": "v2"}),
}
NAMESPACE = "tutorial"
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
    # the secure mesh: a control plane with its CA, workload certificates, STRICT mutual TLS
    secure: bool = False
    # Zipkin collector (HOST:PORT reachable from the lab) the sidecars send spans to, and their sampling
    zipkin_address: str | None = None
    trace_sampling_percent: float = 1.0
    # admin listeners on the node's address (port 15000 left out of inbound capture) so that a scraper
    # in another node reaches /stats/prometheus, as Istio leaves its 15090 out of capture; else loopback
    admin_on_node_address: bool = False
    # the secure mesh: the control plane's mesh view (`--ui-address`) on this port of its node's address
    # (it scrapes the sidecars' admin listeners, so it wants admin_on_node_address)
    ui_port: int | None = None

    # ---- lifecycle

    def up(self) -> "MeshDemo":
        if os.geteuid() != 0:
            raise NamespacesUnavailable("the namespace mesh needs root (network namespaces, iptables)")
        if not iptables.available(4):
            raise NamespacesUnavailable("iptables-restore/iptables-save not found (Debian package iptables)")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="triomesh-mesh-"))
        try:
            nodes = (*NODES, CONTROLPLANE_NODE) if self.secure else NODES
            self.lab = lab_up(nodes, subnet_v6=None, extra_hosts={"recommendation": RECOMMENDATION_VIP})
        except (OSError, LabError) as exc:
            raise NamespacesUnavailable(f"cannot create network namespaces: {exc}") from exc
        for name, address in EXPECTED_ADDRESSES.items():
            if self.lab.node(name).ipv4 != address:
                raise DemoError(f"lab gave {name} {self.lab.node(name).ipv4}, the config expects {address}")
        options = CaptureOptions(proxy_uid=str(PROXY_GID), proxy_gid=str(PROXY_GID),
                                 inbound_ports_exclude=(ADMIN_PORT,) if self.admin_on_node_address else ())
        for name in MESH_APPS:
            try:
                iptables.install(options, netns=self.lab.node(name).netns)
            except iptables.CaptureError as exc:
                raise NamespacesUnavailable(f"cannot install the capture rules: {exc}") from exc
            self.captured.append(name)
        if self.secure:
            self._start_controlplane()
        for name in MESH_APPS:
            self.spawn(f"sidecar-{name}", name, PROXY_GID, self._proxy_argv(name))
        for name, app in MESH_APPS.items():
            self.spawn(name, name, None, [sys.executable, "-m", app[0], "--bind", "0.0.0.0", "--port", str(APP_PORT), *app[1:]])
        self.spawn("outside", "outside", None, [sys.executable, "-m", "examples.apps.recommendation", "--bind", "0.0.0.0",
                                                    "--port", str(APP_PORT), "--version", "outside", "--instance-id", "outside"])
        self.wait_ready()
        if self.secure:
            self.apply(STRICT_MTLS)
            self.wait_secured()
        return self

    def _proxy_argv(self, node: str) -> list[str]:
        assert self.lab is not None
        argv = [sys.executable, "-m", "proxy.cli", "proxy", "--concurrency", "1", "--access-log", self.access_log,
                "--log-format", "json", "--admin-address", f"{self.admin_ip(node)}:{ADMIN_PORT}"]
        if self.zipkin_address is not None:
            argv += ["--zipkin-address", self.zipkin_address, "--trace-sampling", str(self.trace_sampling_percent)]
        if not self.secure:
            return argv + ["--config", str(self.config_dir)]
        workload = WORKLOADS[node]
        argv += ["--controlplane", f"{CONTROLPLANE_NODE}:{CONTROLPLANE_PORT}",
                 "--controlplane-ca", str(self.ca_dir / "root-cert.pem"),
                 "--controlplane-token-file", str(self._token_file(workload.service_account)),
                 "--node-id", workload.node_id, "--workload-name", workload.node_id, "--namespace", NAMESPACE,
                 "--service-account", workload.service_account, "--register", self.lab.node(node).ipv4]
        for key, value in workload.labels.items():
            argv += ["--label", f"{key}={value}"]
        return argv

    # ---- the secure mesh: control plane, tokens, apply

    @property
    def ca_dir(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "ca"

    def _token_file(self, service_account: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{service_account}.token"

    def _start_controlplane(self) -> None:
        """`triomesh controlplane` in its own node, serving the mesh config without the static
        WorkloadEntries (the sidecars register theirs), then one bootstrap token per service account
        and an admin token for `triomesh apply`."""
        assert self.lab is not None and self.log_dir is not None
        config = self.log_dir / "controlplane-config"
        config.mkdir()
        for path in sorted(self.config_dir.glob("*.yaml")):
            if path.name != "workloads.yaml":
                shutil.copy(path, config / path.name)
        port_file = self.log_dir / "controlplane.port"
        self.spawn("controlplane", CONTROLPLANE_NODE, None, [
            sys.executable, "-m", "proxy.cli", "controlplane", "--config", str(config),
            "--listen", f"{self.lab.node(CONTROLPLANE_NODE).ipv4}:{CONTROLPLANE_PORT}", "--port-file", str(port_file),
            "--ca-dir", str(self.ca_dir), "--data-dir", str(self.log_dir / "controlplane-data"),
            "--tls-san", CONTROLPLANE_NODE, "--log-format", "json",
            *(["--ui-address", f"{self.lab.node(CONTROLPLANE_NODE).ipv4}:{self.ui_port}"] if self.ui_port else [])])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.procs["controlplane"].poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the control plane did not start:\n{self.log_tail('controlplane')}")
            time.sleep(0.1)
        for service_account in sorted({workload.service_account for workload in WORKLOADS.values()}):
            self._token_file(service_account).write_bytes(
                self._triomesh("controlplane", "token", "--ca-dir", str(self.ca_dir), "--namespace", NAMESPACE,
                               "--service-account", service_account))
        self._token_file("admin").write_bytes(self._triomesh("controlplane", "token", "--ca-dir", str(self.ca_dir), "--admin"))
        for path in self.log_dir.glob("*.token"):
            path.chmod(0o600)

    def _triomesh(self, *argv: str, node: str | None = None) -> bytes:
        """`triomesh ARGV` (in `node`'s namespace when given); its output, or DemoError with its stderr."""
        command = [sys.executable, "-m", "proxy.cli", *argv]
        if node is not None:
            assert self.lab is not None
            command = self.lab.argv(node, command)
        done = subprocess.run(command, capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              timeout=60)
        if done.returncode != 0:
            raise DemoError(f"triomesh {' '.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.strip()

    def controlplane_cli(self, *argv: str) -> bytes:
        """`triomesh apply|delete|proxy-status ...` from the control plane's node, with the admin token."""
        return self._triomesh(*argv, "--controlplane", f"{CONTROLPLANE_NODE}:{CONTROLPLANE_PORT}",
                              "--controlplane-ca", str(self.ca_dir / "root-cert.pem"),
                              "--token-file", str(self._token_file("admin")), node=CONTROLPLANE_NODE)

    def apply(self, *paths: Path) -> bytes:
        args: list[str] = []
        for path in paths:
            args += ["-f", str(path)]
        return self.controlplane_cli("apply", *args)

    def delete(self, *paths: Path) -> bytes:
        args: list[str] = []
        for path in paths:
            args += ["-f", str(path)]
        return self.controlplane_cli("delete", *args)

    def config_dump(self, node: str) -> dict:
        status, text = self.get(node, self.admin_ip(node), ADMIN_PORT, "/config_dump")
        if status != 200:
            raise DemoError(f"{node} admin answered {status}")
        return json.loads(text)

    def wait_secured(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every sidecar holds a workload certificate, and the flow answers through mutual TLS (the
        registrations have reached the callers' sidecars)."""
        deadline = time.monotonic() + timeout_s
        for node in MESH_APPS:
            while not self.config_dump(node).get("workload_identity", {}).get("serial"):
                if time.monotonic() > deadline:
                    raise DemoError(f"{node}'s sidecar got no workload certificate within {timeout_s}s:\n"
                                    + self.log_tail(f"sidecar-{node}"))
                time.sleep(0.2)
        while True:
            results = self.customer_requests(1)
            if results[0][0] == 200 and "recommendation v" in results[0][1]:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the flow did not answer within {timeout_s}s: {results}\n"
                                + "\n".join(self.log_tail(p) for p in ("controlplane", *(f"sidecar-{n}" for n in MESH_APPS))))
            time.sleep(0.2)

    def admin_ip(self, node: str) -> str:
        assert self.lab is not None
        return self.lab.node(node).ipv4 if self.admin_on_node_address else "127.0.0.1"

    def spawn(self, label: str, node: str, gid: int | None, argv: list[str]) -> None:
        """Start `argv` in `node`'s namespace (as gid `gid` when given), output in LOG_DIR/LABEL.log; `down` stops it."""
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
            controlplane = self.procs.get("controlplane")
            if controlplane is not None and controlplane.poll() is not None:
                raise DemoError(f"the control plane exited with {controlplane.returncode}:\n{self.log_tail('controlplane')}")
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
            status, _ = self.get(node, self.admin_ip(node), ADMIN_PORT, "/ready", timeout_s=1.0)
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
        """`count` requests from the client node to http://customer:8080/ over one keep-alive connection
        (to customer's address, with the Host header a client calling it by name sends)."""
        assert self.lab is not None
        headers = {"host": f"customer:{APP_PORT}", **(headers or {})}
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
        status, text = self.get(node, self.admin_ip(node), ADMIN_PORT, "/stats/prometheus")
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


def run(requests: int, access_log: str = "off", config_dir: Path = MESH_CONFIG, keep_logs: bool = False,
        secure: bool = False) -> int:
    with MeshDemo(config_dir=config_dir, access_log=access_log, secure=secure) as mesh:
        assert mesh.lab is not None
        print(f"lab {mesh.lab.run_id}: " + ", ".join(f"{n.name} {n.ipv4}" for n in mesh.lab.nodes.values())
              + f"; recommendation VIP {RECOMMENDATION_VIP}")
        print(f"capture rules and a sidecar (gid {PROXY_GID}) in: {', '.join(MESH_APPS)}")
        secured = True
        if secure:
            print(f"control plane (CA, TLS) on {CONTROLPLANE_NODE}:{CONTROLPLANE_PORT}; applied {STRICT_MTLS.relative_to(REPO)}")
            for name in MESH_APPS:
                identity = mesh.config_dump(name).get("workload_identity", {})
                print(f"  {name}'s sidecar: {identity.get('spiffe_id')} (serial {identity.get('serial')})")
            preference = mesh.lab.node("preference").ipv4
            secured = refused_tcp(mesh, "client", preference, APP_PORT)
            print(f"  plaintext from the client node straight to preference:{APP_PORT}: "
                  + ("refused (STRICT)" if secured else "NOT refused"))

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
        if secure:
            print(f"  with mutual TLS: {stat_value(stats, 'istio_requests_total', reporter='destination', connection_security_policy='mutual_tls'):.0f}"
                  " requests reached preference, from " + ", ".join(
                      sorted(set(re.findall(r'source_principal="([^"]+)"', stats)) - {"unknown"})))
        passed = (ok == requests and counts.get("error", 0) == 0 and jason_counts == {"v2": 10}
                  and status == 502 and tcp_refused and secured)
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
    parser.add_argument("--plaintext", action="store_true",
                        help="sidecars configured from --config files, no control plane, no mutual TLS (default: "
                             "a control plane with its CA gives every sidecar a workload certificate; STRICT mutual TLS)")
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
        return run(max(1, min(args.requests, 100_000)), args.access_log, args.config, args.keep_logs, not args.plaintext)
    except NamespacesUnavailable as exc:
        print(f"mesh demo: {exc}", file=sys.stderr)
        return EXIT_NO_NAMESPACES
    except DemoError as exc:
        print(f"mesh demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
