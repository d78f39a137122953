"""`python -m examples.demo`: the classic mesh on loopback behind the triomesh gateway, with its 80/20 split.

What it does, in order:
1. reads the Istio resources in examples/demo/ to learn the ports and which workloads to run
   (every WorkloadEntry labelled `app`/`version` becomes one app process on its port);
2. checks those ports are free on 127.0.0.1 and says which one is not;
3. starts the apps with `http_proxy` pointing at the Sidecar egress listener, so their calls to
   `http://preference:8080/` go through the mesh, then `triomesh proxy --config examples/demo`;
4. waits for the admin `/ready`, sends 100 requests to the Gateway listener, prints each answer, the
   observed v1/v2 split and an excerpt of `/stats/prometheus`;
5. stops everything it started: SIGTERM by PID, then SIGKILL of that process's own group for
   anything left (each child runs in a session of its own), also on Ctrl-C, SIGTERM or an error.

With `--controlplane` the config comes from a control plane instead, and changes under live traffic:
`triomesh controlplane --config examples/demo --ca-dir DIR` (TLS on port 15010, its CA in the run's log
directory), a bootstrap token for the namespace and an admin token (`triomesh controlplane token`), the
same apps, and `triomesh proxy --controlplane 127.0.0.1:15010 --controlplane-ca DIR/root-cert.pem
--controlplane-token-file ... --namespace tutorial` with no --config (everything is pushed, and the proxy
gets its workload certificate); steady
traffic on keep-alive connections; the split with 80/20; `triomesh apply -f
examples/demo/changes/recommendation-v2.yaml` (v1 0%, v2 100%); how long after apply returned the last
answer from v1 came (every later one is v2); the split from 1 s after the change; failed requests; and
`triomesh proxy-status`.

The same pieces (`read_plan`, `relocate_config`, `Mesh`, `send_requests`, `TrafficLoop`, `shift_report`)
are used by the integration test, which moves every port to a free one so it cannot collide with anything.
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
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = Path(__file__).resolve().with_name("demo")
ADMIN_PORT = 15000
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
CONTROLPLANE_PORT = 15010  # istiod's xDS port, triomesh controlplane's default
PROXY_NODE_ID = "demo-proxy"
WEIGHTS_CHANGE = DEMO_CONFIG / "changes" / "recommendation-v2.yaml"

# the full chain every good answer has; group 1 is the version, group 2 the instance
CHAIN = re.compile(r"^customer => preference => recommendation (v\d+) from '([^']*)': \d+$")
VERSION = re.compile(r"recommendation (v\d+) from")


@dataclass(frozen=True)
class Workload:
    """One app process to run, taken from a WorkloadEntry."""

    name: str  # the WorkloadEntry's name, also the instance id the app reports
    app: str  # label `app`: which module of examples/apps runs
    version: str  # label `version`
    port: int


@dataclass(frozen=True)
class Plan:
    """Everything the demo needs to know from the config: where to listen and what to run."""

    gateway_port: int
    egress_port: int
    workloads: tuple[Workload, ...]
    admin_port: int = ADMIN_PORT
    split: dict[str, int] = field(default_factory=dict)  # subset -> weight of the recommendation route
    namespace: str = "default"  # the Sidecar's namespace: a proxy there gets its egress listener

    def ports(self) -> list[tuple[int, str]]:
        named = [(self.gateway_port, "gateway listener"), (self.egress_port, "sidecar egress listener"),
                 (self.admin_port, "proxy admin")]
        return named + [(w.port, f"app {w.name}") for w in self.workloads]


def _documents(config_dir: Path) -> Iterator[dict]:
    for path in sorted(config_dir.glob("*.y*ml")):
        yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def recommendation_split(docs: Iterable[dict]) -> dict[str, int]:
    """subset -> weight of the first route of the VirtualService for `recommendation` ({} if none)."""
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "VirtualService" and "recommendation" in spec.get("hosts", []):
            return {dest["destination"].get("subset", ""): dest.get("weight", 100)
                    for dest in spec["http"][0]["route"]}
    return {}


def read_plan(config_dir: Path = DEMO_CONFIG, *, admin_port: int = ADMIN_PORT) -> Plan:
    gateway_ports: list[int] = []
    egress_ports: list[int] = []
    workloads: list[Workload] = []
    namespace = "default"
    docs = list(_documents(config_dir))
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Gateway":
            gateway_ports += [server["port"]["number"] for server in spec["servers"]]
        elif kind == "Sidecar":
            egress_ports += [e["port"]["number"] for e in spec.get("egress", []) if "port" in e]
            namespace = doc.get("metadata", {}).get("namespace", namespace)
        elif kind == "WorkloadEntry":
            labels = spec.get("labels", {})
            workloads.append(Workload(name=doc["metadata"]["name"], app=labels["app"],
                                      version=labels.get("version", "v1"), port=spec["ports"]["http"]))
    if len(gateway_ports) != 1 or len(egress_ports) != 1:
        raise ValueError(f"{config_dir}: expected one Gateway port and one Sidecar egress port, "
                         f"found {gateway_ports} and {egress_ports}")
    return Plan(gateway_ports[0], egress_ports[0], tuple(workloads), admin_port, recommendation_split(docs),
                namespace)


def relocate_config(src: Path, dst: Path, new_port: Callable[[], int]) -> Plan:
    """Copy the config in `src` to `dst` with every listener and workload port replaced by `new_port()`.

    Used by the tests: the same resources as the demo, on ports nobody else holds.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.y*ml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for doc in docs:
            kind, spec = doc["kind"], doc.get("spec", {})
            if kind == "Gateway":
                for server in spec["servers"]:
                    server["port"]["number"] = new_port()
            elif kind == "Sidecar":
                for egress in spec.get("egress", []):
                    if "port" in egress:
                        egress["port"]["number"] = new_port()
            elif kind == "WorkloadEntry":
                spec["ports"] = {name: new_port() for name in spec["ports"]}
        (dst / path.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return read_plan(dst, admin_port=new_port())


def free_port() -> int:
    """A port the kernel just handed out on loopback (it stays free for practical purposes)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def unique_free_ports() -> Callable[[], int]:
    """A `free_port` that never hands out the same port twice (the kernel may, one call after another)."""
    seen: set[int] = set()

    def next_port() -> int:
        while (port := free_port()) in seen:
            pass
        seen.add(port)
        return port

    return next_port


def busy_ports(plan: Plan) -> list[tuple[int, str]]:
    return busy_ports_named(plan.ports())


def report_busy(busy: list[tuple[int, str]]) -> None:
    print("triomesh demo: these ports on 127.0.0.1 are taken, so the demo cannot start:", file=sys.stderr)
    for port, what in busy:
        print(f"  {port}  ({what})", file=sys.stderr)
    print("Stop whatever listens there (`ss -ltnp` shows it) and run the demo again.", file=sys.stderr)


def busy_ports_named(ports: list[tuple[int, str]]) -> list[tuple[int, str]]:
    busy = []
    for port, what in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                busy.append((port, what))
    return busy


class MeshError(RuntimeError):
    pass


def triomesh_command() -> list[str]:
    script = Path(sys.executable).with_name("triomesh")
    if script.exists():
        return [str(script)]
    found = shutil.which("triomesh")
    if found:
        return [found]
    raise MeshError("the `triomesh` command is not installed in this environment; `make demo` installs it")


class Mesh:
    """The processes of one demo run. Each runs in its own session (process group = its PID), so
    stopping signals exactly what we started, worker processes included, and nothing else."""

    def __init__(self, plan: Plan, config_dir: Path, log_dir: Path, *, access_log: str = "off",
                 controlplane_port: int | None = None) -> None:
        """`controlplane_port`: None runs the proxy on `config_dir` itself; a port (0: any free one)
        runs `triomesh controlplane --config config_dir` there and the proxy with `--controlplane` only."""
        self.plan = plan
        self.config_dir = config_dir
        self.log_dir = log_dir
        self.access_log = access_log
        self.controlplane_port = controlplane_port
        self.procs: dict[str, subprocess.Popen] = {}
        # the control plane's CA (made on its first start) and the tokens this run makes with it
        self.data_dir = log_dir  # the control plane's state (and its CA in ca/): one run's, not the user's
        self.ca_dir = log_dir / "ca"
        self.root_certificate = self.ca_dir / "root-cert.pem"
        self.admin_token_file = log_dir / "admin.token"

    @property
    def controlplane_address(self) -> str:
        return f"{LOOPBACK}:{self.controlplane_port}"

    # -- starting

    def start(self) -> None:
        port_file = self.log_dir / "controlplane.port"
        if self.controlplane_port is not None:
            # first, so it is listening by the time the proxy connects (the proxy would retry anyway,
            # but with back-off); JSON at info: the log says when it accepted a change
            self._spawn("controlplane", triomesh_command() + [
                "controlplane", "--config", str(self.config_dir), "--listen", self.controlplane_address,
                "--data-dir", str(self.data_dir), "--ca-dir", str(self.ca_dir), "--port-file", str(port_file),
                "--log-level", "info",
                "--log-format", "json"], os.environ.copy())
        app_env = {k: v for k, v in os.environ.items()
                   if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        # the one thing that puts the apps into the mesh: their HTTP client's standard proxy variable
        app_env["http_proxy"] = f"http://{LOOPBACK}:{self.plan.egress_port}"
        app_env["PYTHONUNBUFFERED"] = "1"
        app_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        for w in self.plan.workloads:
            argv = [sys.executable, "-m", f"examples.apps.{w.app}", "--bind", LOOPBACK, "--port", str(w.port)]
            if w.app == "recommendation":
                argv += ["--version", w.version, "--instance-id", w.name]
            self._spawn(w.name, argv, app_env)
        if self.controlplane_port is None:
            source = ["--config", str(self.config_dir)]
        else:
            self._wait("controlplane", time.monotonic() + READY_TIMEOUT_S,
                       lambda: port_file.exists() and port_file.read_text().strip() != "")
            self.controlplane_port = int(port_file.read_text())
            # the proxy proves its identity with a bootstrap token for its namespace; the CLIs use an admin token
            token_file = self.log_dir / f"{self.plan.namespace}.token"
            token_file.write_text(self.make_token("--namespace", self.plan.namespace))
            self.admin_token_file.write_text(self.make_token("--admin"))
            # no --config: everything comes from the control plane; the namespace picks the Sidecar
            source = ["--controlplane", self.controlplane_address, "--controlplane-ca", str(self.root_certificate),
                      "--controlplane-token-file", str(token_file), "--node-id", PROXY_NODE_ID,
                      "--namespace", self.plan.namespace, "--label", "istio=ingressgateway"]
        self._spawn("proxy", triomesh_command() + [
            "proxy", *source, "--concurrency", "1",
            "--bind-address", LOOPBACK, "--admin-address", f"{LOOPBACK}:{self.plan.admin_port}",
            "--access-log", self.access_log, "--log-level", "warning"], os.environ.copy())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        with log:
            self.procs[name] = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Every app accepts connections and the proxy's admin says /ready."""
        deadline = time.monotonic() + timeout_s
        for w in self.plan.workloads:
            self._wait(w.name, deadline, lambda port=w.port: _accepts(port))
        self._wait("proxy", deadline, lambda: http_get(self.plan.admin_port, "/ready")[0] == 200)

    def _wait(self, name: str, deadline: float, ready: Callable[[], bool]) -> None:
        while True:
            self.check_alive()
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise MeshError(f"{name} was not ready in time\n{self.log_tail(name)}")
            time.sleep(0.05)

    def make_token(self, *grant: str) -> str:
        done = subprocess.run(triomesh_command() + ["controlplane", "token", "--ca-dir", str(self.ca_dir), *grant],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise MeshError(f"triomesh controlplane token {' '.join(grant)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def cli(self, *argv: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`triomesh SUBCOMMAND ARGS... --controlplane ADDRESS` (apply, proxy-status, ...), over TLS
        with the admin token."""
        return subprocess.run(triomesh_command() + [*argv, "--controlplane", self.controlplane_address,
                                                    "--controlplane-ca", str(self.root_certificate),
                                                    "--token-file", str(self.admin_token_file)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise MeshError(f"{name} exited with status {proc.returncode}\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        tail = text.splitlines()[-lines:]
        return f"--- last lines of {path} ---\n" + "\n".join(tail) if tail else f"({path} is empty)"

    # -- stopping

    def stop_one(self, name: str, timeout_s: float = 10.0) -> None:
        """Stop one process (an app, say, to see the mesh answer for a dead upstream)."""
        proc = self.procs.pop(name)
        _terminate(proc)
        _wait_then_kill_group(proc, time.monotonic() + timeout_s)

    def stop(self, timeout_s: float = 10.0) -> list[str]:
        """SIGTERM each process we started and wait for it; SIGKILL its group if anything is left.

        Only the leader gets SIGTERM: the proxy's supervisor stops its own workers (they flush their
        access logs on the way out), as it would under a service manager. Returns the names stopped.
        """
        for proc in self.procs.values():
            _terminate(proc)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            _wait_then_kill_group(proc, deadline)
        stopped = list(self.procs)
        self.procs.clear()
        return stopped

    def __enter__(self) -> "Mesh":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def _wait_then_kill_group(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    try:
        # the group we created with start_new_session (pgid == our child's PID): the leader if it
        # ignored SIGTERM, or workers it left behind; an empty group is simply gone
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _accepts(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1):
        return True


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore any proxy of our own env


def http_get(port: int, path: str, *, headers: dict[str, str] | None = None,
             timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH directly (never through a proxy of our environment): (status, body)."""
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", headers=headers or {})
    try:
        with _DIRECT.open(request, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def send_requests(port: int, count: int, *, concurrency: int = 1) -> list[tuple[int, str]]:
    """`count` GETs of / on the gateway; (status, body stripped) in the order sent."""
    def one(_: int) -> tuple[int, str]:
        try:
            status, body = http_get(port, "/")
        except OSError as e:
            return 0, f"request failed: {e}"
        return status, body.strip()

    if concurrency == 1:
        return [one(i) for i in range(count)]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def version_counts(bodies: Iterable[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for body in bodies:
        m = VERSION.search(body)
        counts[m.group(1) if m else "error"] += 1
    return counts


def stats_excerpt(admin_port: int, max_lines: int = 12) -> list[str]:
    status, text = http_get(admin_port, "/stats/prometheus")
    if status != 200:
        return [f"(/stats/prometheus answered {status})"]
    wanted = ("triomesh_downstream_rq_total", "triomesh_upstream_rq_total", "triomesh_upstream_cx_total")
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    return lines[:max_lines]


# -- the control-plane mode: live traffic while `triomesh apply` changes the weights


@dataclass(frozen=True)
class Answer:
    """One request of the traffic loop: when it was sent and answered (time.monotonic()), and how."""

    sent: float
    received: float
    status: int  # 0: no HTTP answer at all (connection refused, reset, timeout)
    body: str

    @property
    def ok(self) -> bool:
        return self.status == 200 and CHAIN.match(self.body) is not None

    @property
    def version(self) -> str:
        m = VERSION.search(self.body)
        return m.group(1) if m and self.status == 200 else "error"


class TrafficLoop:
    """Steady traffic to the gateway from background threads: `connections` keep-alive connections,
    each sending its next GET / as soon as the last one is answered, until `stop()`, `max_requests`
    sent or `max_s` passed. Every answer is kept; nothing is retried (a failure is a failure)."""

    def __init__(self, port: int, *, connections: int = 8, max_requests: int = 20_000, max_s: float = 30.0) -> None:
        self.port = port
        self.connections = connections
        self.max_requests = max_requests
        self.max_s = max_s
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sent = 0
        self._deadline = 0.0

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_s
        self._threads = [threading.Thread(target=self._client, name=f"traffic-{i}", daemon=True)
                         for i in range(self.connections)]
        for t in self._threads:
            t.start()

    def stop(self) -> list[Answer]:
        """Stop sending, wait for the requests in flight, and return every answer in order of sending."""
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 1)
        return self.answers()

    def answers(self) -> list[Answer]:
        with self._lock:
            return sorted(self._answers, key=lambda a: a.sent)

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests or time.monotonic() > self._deadline:
                return False
            self._sent += 1
            return True

    def _client(self) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            while self._take():
                sent = time.monotonic()
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    status, body = resp.status, resp.read().decode("utf-8", "replace").strip()
                except (OSError, http.client.HTTPException) as e:
                    status, body = 0, f"request failed: {type(e).__name__}: {e}"
                    conn.close()  # a fresh connection for the next request
                with self._lock:
                    self._answers.append(Answer(sent, time.monotonic(), status, body))
        finally:
            conn.close()


def split_text(answers: list[Answer]) -> str:
    counts = collections.Counter(a.version for a in answers)
    n = len(answers)
    return "  ".join(f"{v} {counts[v]}/{n} = {100 * counts[v] / n:.0f}%" for v in sorted(counts)) if n else "no answers"


def configured_text(split: dict[str, int]) -> str:
    return ", ".join(f"{subset} {weight}%" for subset, weight in split.items())


@dataclass(frozen=True)
class ShiftReport:
    """How live traffic moved after `triomesh apply`, all times relative to apply's return (seconds).

    `last_retired_s`: when the last answer from a retired version (weight now 0) was received; every
    answer received after it came from the versions still weighted. The proxy routed that request
    before answering it, so the old weights were still serving then; a new request arrived every few
    milliseconds, so it is also when the new weights took over, to within that spacing.
    """

    retired: frozenset[str]  # versions (subset names) whose weight the change set to 0
    last_retired_s: float | None  # None: no answer from a retired version after the apply started
    settled: list[Answer]  # answers to requests sent 1 s or more after apply returned
    failed: list[Answer]  # every failure of the whole run

    @property
    def shifted_within_1s(self) -> bool:
        return (self.last_retired_s is not None and self.last_retired_s < 1.0 and bool(self.settled)
                and not any(a.version in self.retired for a in self.settled))


def shift_report(answers: list[Answer], launched: float, returned: float, retired: frozenset[str]) -> ShiftReport:
    retired_after = [a.received for a in answers if a.version in retired and a.received >= launched]
    return ShiftReport(retired=retired,
                       last_retired_s=max(retired_after) - returned if retired_after else None,
                       settled=[a for a in answers if a.sent >= returned + 1.0],
                       failed=[a for a in answers if not a.ok])


def accepted_at(log_path: Path, wall_to_monotonic: float) -> float | None:
    """When the control plane accepted the apply (its JSON log's UTC timestamp), on our monotonic clock."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if '"config_changed"' in line and '"apply"' in line:
            try:
                record = json.loads(line)
                wall = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
            return wall + wall_to_monotonic
    return None


def wait_synced(mesh: Mesh, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Poll `triomesh proxy-status` until our proxy has ACKed what it was sent; (synced, last output)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = mesh.cli("proxy-status")
        text = (done.stdout + done.stderr).rstrip()
        row = [PROXY_NODE_ID, mesh.plan.namespace, LOOPBACK, "SYNCED"]
        synced = done.returncode == 0 and any(line.split()[:4] == row for line in text.splitlines())
        if synced or time.monotonic() > deadline:
            return synced, text
        time.sleep(0.2)


def run_controlplane(config_dir: Path, change: Path, access_log: str, admin_port: int = ADMIN_PORT,
                     controlplane_port: int = CONTROLPLANE_PORT, before_s: float = 2.0, after_s: float = 2.5) -> int:
    plan = read_plan(config_dir, admin_port=admin_port)
    try:
        new_split = recommendation_split(doc for doc in yaml.safe_load_all(change.read_text()) if doc)
    except (OSError, yaml.YAMLError) as e:
        print(f"triomesh demo: cannot read the change {change}: {e}", file=sys.stderr)
        return 2
    if not new_split:
        print(f"triomesh demo: {change} holds no VirtualService for recommendation", file=sys.stderr)
        return 2
    busy = busy_ports(plan) + (busy_ports_named([(controlplane_port, "control plane")]) if controlplane_port else [])
    if busy:
        report_busy(busy)
        return 2

    retired = frozenset(subset for subset, weight in new_split.items() if weight == 0)
    print(f"triomesh demo, config from the control plane: customer -> preference -> recommendation, "
          f"split at the mesh: {configured_text(plan.split)}")
    log_dir = Path(tempfile.mkdtemp(prefix="triomesh-demo-"))
    mesh = Mesh(plan, config_dir, log_dir, access_log=access_log, controlplane_port=controlplane_port)
    traffic = TrafficLoop(plan.gateway_port, max_s=before_s + after_s + 30.0)
    try:
        mesh.start()
        for name, proc in mesh.procs.items():
            print(f"  started {name:<18} pid {proc.pid}")
        mesh.wait_ready()
        print(f"  ready: control plane {mesh.controlplane_address} (triomesh controlplane --config {config_dir} "
              f"--ca-dir {mesh.ca_dir}: TLS)\n"
              f"         proxy {PROXY_NODE_ID} (namespace {plan.namespace}, no --config: everything pushed), "
              f"gateway http://{LOOPBACK}:{plan.gateway_port}/  admin http://{LOOPBACK}:{plan.admin_port}/")

        print(f"\nsteady traffic to http://{LOOPBACK}:{plan.gateway_port}/ "
              f"on {traffic.connections} keep-alive connections")
        traffic.start()
        time.sleep(before_s)
        before = traffic.answers()
        print(f"split before the change ({before_s:.1f} s): {split_text(before)}   "
              f"(configured: {configured_text(plan.split)})")

        print(f"\ntriomesh apply -f {change}   ({configured_text(new_split)})")
        wall_to_monotonic = time.monotonic() - time.time()
        launched = time.monotonic()
        applied = mesh.cli("apply", "-f", str(change))
        returned = time.monotonic()
        for line in (applied.stdout + applied.stderr).splitlines():
            print(f"  {line}")
        if applied.returncode != 0:
            raise MeshError(f"triomesh apply failed with status {applied.returncode}")
        accepted = accepted_at(log_dir / "controlplane.log", wall_to_monotonic)
        print(f"  apply returned after {returned - launched:.3f} s (CLI start-up included)"
              + (f"; the control plane accepted the change {returned - accepted:.3f} s before that (its log)"
                 if accepted is not None else ""))
        time.sleep(after_s)
        answers = traffic.stop()
        mesh.check_alive()

        report = shift_report(answers, launched, returned, retired)
        print()
        if not retired:
            print("(no version's weight went to 0, so there is no last answer to time the shift by)")
        elif report.last_retired_s is None:
            print(f"no answer from {'/'.join(sorted(retired))} after apply started: traffic had shifted already")
        else:
            print(f"traffic shifted {report.last_retired_s:.3f} s after `triomesh apply` returned: the last answer "
                  f"from {'/'.join(sorted(retired))} was received then, every later one came from the new weights")
            if accepted is not None:
                print(f"  ({report.last_retired_s + returned - accepted:.3f} s after the control plane "
                      "accepted the change)")
        print(f"split from 1 s after the change ({len(report.settled)} requests): {split_text(report.settled)}"
              f"   (configured: {configured_text(new_split)})")
        print(f"requests: {len(answers)} sent, {len(report.failed)} failed (any status but 200 or an incomplete chain)")
        for a in report.failed[:5]:
            print(f"  failed: [{a.status}] {a.body[:200]}")

        synced, status_text = wait_synced(mesh)
        print("\ntriomesh proxy-status")
        for line in status_text.splitlines():
            print(f"  {line}")
        mesh.check_alive()
        ok = not report.failed and synced and (report.shifted_within_1s or not retired)
        print(f"\nresult: {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1
    except MeshError as e:
        print(f"triomesh demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        traffic.stop()
        stopped = mesh.stop()
        print(f"\nstopped {len(stopped)} processes ({', '.join(stopped)}); logs in {log_dir}")


def run(config_dir: Path, requests: int, access_log: str, admin_port: int = ADMIN_PORT) -> int:
    plan = read_plan(config_dir, admin_port=admin_port)
    busy = busy_ports(plan)
    if busy:
        report_busy(busy)
        return 2

    split = ", ".join(f"{subset} {weight}%" for subset, weight in plan.split.items())
    print(f"triomesh demo: customer -> preference -> recommendation, split at the mesh: {split}")
    log_dir = Path(tempfile.mkdtemp(prefix="triomesh-demo-"))
    mesh = Mesh(plan, config_dir, log_dir, access_log=access_log)
    try:
        mesh.start()
        for name, proc in mesh.procs.items():
            print(f"  started {name:<18} pid {proc.pid}")
        mesh.wait_ready()
        print(f"  ready: gateway http://{LOOPBACK}:{plan.gateway_port}/  admin http://{LOOPBACK}:{plan.admin_port}/"
              f"  (apps reach each other via http_proxy=http://{LOOPBACK}:{plan.egress_port})")
        print(f"\nsending {requests} requests to http://{LOOPBACK}:{plan.gateway_port}/")
        results = send_requests(plan.gateway_port, requests)
        for i, (status, body) in enumerate(results, 1):
            print(f"  {i:3}  {body}" if status == 200 else f"  {i:3}  [{status}] {body}")
        counts = version_counts(body for status, body in results if status == 200)
        failed = sum(1 for status, body in results if status != 200 or not CHAIN.match(body))
        shares = "  ".join(f"{v} {counts[v]}/{requests} = {100 * counts[v] / requests:.0f}%"
                           for v in sorted(counts))
        print(f"\nobserved split: {shares}   (configured: {split})")
        if failed:
            print(f"{failed} of {requests} requests did not get the full chain customer => preference => recommendation")
        print(f"\n/stats/prometheus (excerpt, http://{LOOPBACK}:{plan.admin_port}/stats/prometheus):")
        for line in stats_excerpt(plan.admin_port):
            print(f"  {line}")
        mesh.check_alive()
        return 1 if failed else 0
    except MeshError as e:
        print(f"triomesh demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        stopped = mesh.stop()
        print(f"\nstopped {len(stopped)} processes ({', '.join(stopped)}); logs in {log_dir}")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so `run`'s finally still stops every process we started."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="directory of Istio resources")
    parser.add_argument("--requests", type=int, default=100, help="how many requests to send (default 100)")
    parser.add_argument("--admin-port", type=int, default=ADMIN_PORT,
                        help=f"port of the proxy's admin listener (default {ADMIN_PORT})")
    parser.add_argument("--access-log", choices=["off", "json", "console"], default="off",
                        help="proxy access log format, written to its log file (default off)")
    cp = parser.add_argument_group("control plane (the config pushed, the weights changed under live traffic)")
    cp.add_argument("--controlplane", action="store_true",
                    help="run `triomesh controlplane --config DIR` and the proxy with --controlplane only; send "
                         "steady traffic, `triomesh apply` the --change and time how fast traffic follows")
    cp.add_argument("--controlplane-port", type=int, default=CONTROLPLANE_PORT,
                    help=f"port of the control plane on 127.0.0.1 (default {CONTROLPLANE_PORT}; 0: any free one)")
    cp.add_argument("--change", type=Path, default=WEIGHTS_CHANGE,
                    help="the YAML to apply (default examples/demo/changes/recommendation-v2.yaml: v1 0%%, v2 100%%)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.controlplane:
            return run_controlplane(args.config, args.change, args.access_log, args.admin_port,
                                    args.controlplane_port)
        return run(args.config, args.requests, args.access_log, args.admin_port)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
