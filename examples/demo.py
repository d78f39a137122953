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

The same pieces (`read_plan`, `relocate_config`, `Mesh`, `send_requests`) are used by the integration
test, which moves every port to a free one so it cannot collide with anything.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = Path(__file__).resolve().with_name("demo")
ADMIN_PORT = 15000
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0

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

    def ports(self) -> list[tuple[int, str]]:
        named = [(self.gateway_port, "gateway listener"), (self.egress_port, "sidecar egress listener"),
                 (self.admin_port, "proxy admin")]
        return named + [(w.port, f"app {w.name}") for w in self.workloads]


def _documents(config_dir: Path) -> Iterator[dict]:
    for path in sorted(config_dir.glob("*.y*ml")):
        yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def read_plan(config_dir: Path = DEMO_CONFIG, *, admin_port: int = ADMIN_PORT) -> Plan:
    gateway_ports: list[int] = []
    egress_ports: list[int] = []
    workloads: list[Workload] = []
    split: dict[str, int] = {}
    for doc in _documents(config_dir):
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Gateway":
            gateway_ports += [server["port"]["number"] for server in spec["servers"]]
        elif kind == "Sidecar":
            egress_ports += [e["port"]["number"] for e in spec.get("egress", []) if "port" in e]
        elif kind == "WorkloadEntry":
            labels = spec.get("labels", {})
            workloads.append(Workload(name=doc["metadata"]["name"], app=labels["app"],
                                      version=labels.get("version", "v1"), port=spec["ports"]["http"]))
        elif kind == "VirtualService" and "recommendation" in spec.get("hosts", []):
            for dest in spec["http"][0]["route"]:
                split[dest["destination"].get("subset", "")] = dest.get("weight", 100)
    if len(gateway_ports) != 1 or len(egress_ports) != 1:
        raise ValueError(f"{config_dir}: expected one Gateway port and one Sidecar egress port, "
                         f"found {gateway_ports} and {egress_ports}")
    return Plan(gateway_ports[0], egress_ports[0], tuple(workloads), admin_port, split)


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
    busy = []
    for port, what in plan.ports():
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

    def __init__(self, plan: Plan, config_dir: Path, log_dir: Path, *, access_log: str = "off") -> None:
        self.plan = plan
        self.config_dir = config_dir
        self.log_dir = log_dir
        self.access_log = access_log
        self.procs: dict[str, subprocess.Popen] = {}

    # -- starting

    def start(self) -> None:
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
        self._spawn("proxy", triomesh_command() + [
            "proxy", "--config", str(self.config_dir), "--concurrency", "1",
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


def run(config_dir: Path, requests: int, access_log: str, admin_port: int = ADMIN_PORT) -> int:
    plan = read_plan(config_dir, admin_port=admin_port)
    busy = busy_ports(plan)
    if busy:
        print("triomesh demo: these ports on 127.0.0.1 are taken, so the demo cannot start:", file=sys.stderr)
        for port, what in busy:
            print(f"  {port}  ({what})", file=sys.stderr)
        print("Stop whatever listens there (`ss -ltnp` shows it) and run the demo again.", file=sys.stderr)
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
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args.config, args.requests, args.access_log, args.admin_port)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
