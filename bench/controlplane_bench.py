"""Control-plane push benchmark: N simulated proxies on one control plane; time from a config change to
the last ACK, control-plane CPU and RSS, bytes per push.

The control plane is the real `controlplane.cli controlplane` process. The proxies are simulated the
way a load tool would hold them: a few client processes (at least one per replica), each one raw epoll
loop over thousands of TCP connections, no task or thread per proxy. What a simulated proxy does, as a
real one: a Hello with its own node id and labels (10 label sets by default, plus a `pod` label unique
to each), decoding every frame it is sent with the protocol's decoder, an ACK naming the exact version
and nonce of each Snapshot (a lost, repeated or wrong push shows as a missing or unknown ACK, and the
control plane closes a stream that ACKs a nonce it did not send), heartbeats every interval the
Welcome names. What it does not do: turn the resources into config (no loader checks, no compile, no
workers; `bench/config_push.py` measures that part), NACK, reconnect, TLS or tokens (the control plane
runs with --insecure-plaintext: this measures pushes, not handshakes). On a machine with at least two
cores the control plane is pinned to one core and the clients to the others, so their CPU does not
count against it. Loopback only; every loop is bounded in count and time.

Each round: the driver applies a weight change over the wire (t0 = CLOCK_MONOTONIC, shared by all
processes on Linux), every client records when it sent the ACK of the snapshot that followed, and the
round's figures are the distribution of (ack time - t0) over all proxies. The control plane's debounce
(100 ms quiet time by default) is part of that time, as it would be in use.

With `NxR` in --proxies, the N proxies are spread over R control-plane replicas sharing one etcd
(started here on loopback unless --store names one); the change goes through the first replica and
reaches the others' proxies through the store; CPU is reported per replica.

usage: python bench/controlplane_bench.py [--proxies 1000 5000 10000x3] [--rounds 5] [--services 50]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMESPACE = "bench"
CONNECT_BATCH = 200
SETTLE_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------
# config


def mesh_yaml(services: int, *, version_weight: int = 80, changed: int = 0) -> dict[str, str]:
    """One file per service: ServiceEntry + 2 WorkloadEntries + DestinationRule (2 subsets) + an
    80/20 VirtualService. `changed` names the service whose weights are `version_weight`/rest."""
    files = {}
    for i in range(services):
        w = version_weight if i == changed else 80
        files[f"svc{i:03d}.yaml"] = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}, namespace: {NAMESPACE}}}
spec:
  hosts: [svc{i}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: svc{i}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: svc{i}-v1, namespace: {NAMESPACE}}}
spec: {{address: 127.0.0.1, ports: {{http: {20000 + 2 * i}}}, labels: {{app: svc{i}, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: svc{i}-v2, namespace: {NAMESPACE}}}
spec: {{address: 127.0.0.1, ports: {{http: {20001 + 2 * i}}}, labels: {{app: svc{i}, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc{i}, namespace: {NAMESPACE}}}
spec:
  host: svc{i}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
""" + vs_yaml(i, w)
    return files


def vs_yaml(i: int, w: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc{i}, namespace: {NAMESPACE}}}
spec:
  hosts: [svc{i}]
  http:
  - route:
    - {{destination: {{host: svc{i}, subset: v1}}, weight: {w}}}
    - {{destination: {{host: svc{i}, subset: v2}}, weight: {100 - w}}}
"""


# --------------------------------------------------------------------------------------------------
# the simulated proxies (client processes)


def client_main(args: argparse.Namespace) -> int:
    """One simulator process: `args.count` proxy streams on one raw epoll loop (no task per stream,
    no Trio), as a load tool would hold them."""
    import select
    import socket

    from controlplane.wire import Ack, Error, FrameDecoder, Heartbeat, Hello, ProtocolError, Snapshot, Welcome, encode_frame

    records: list[tuple] = []  # (index, version, full, frame_bytes, t_ack, t_recv)
    acks: dict[tuple[str, str], bytes] = {}  # encoded ACK frames by (version, nonce), as decoded
    sizes: dict[tuple[str, bool], int] = {}  # frame bytes per (version, full): the same for every proxy
    acked: dict[str, int] = {}  # version -> proxies of this process that ACKed it
    streams: dict[int, _SimulatedProxy] = {}  # by file descriptor
    epoll = select.epoll()
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    connected = failed = 0
    heartbeat_interval_s = 5.0
    heartbeat = encode_frame(Heartbeat())

    def close(proxy: _SimulatedProxy) -> None:
        streams.pop(proxy.sock.fileno(), None)
        epoll.unregister(proxy.sock)
        proxy.sock.close()

    def send(proxy: _SimulatedProxy, frame: bytes) -> None:
        if proxy.outbox:  # frames never overtake each other
            proxy.outbox += frame
            return
        try:
            n = proxy.sock.send(frame)
        except BlockingIOError:
            n = 0
        if n < len(frame):
            proxy.outbox += frame[n:]
            epoll.modify(proxy.sock, select.EPOLLIN | select.EPOLLOUT)

    def flush(proxy: _SimulatedProxy) -> None:
        n = proxy.sock.send(proxy.outbox)
        del proxy.outbox[:n]
        if not proxy.outbox:
            epoll.modify(proxy.sock, select.EPOLLIN)

    def receive(proxy: _SimulatedProxy) -> None:
        nonlocal connected, heartbeat_interval_s
        data = proxy.sock.recv(262144)
        if not data:
            raise ConnectionError("end of stream")
        t_recv = time.monotonic()
        for m in proxy.decoder.feed(data):
            if isinstance(m, Snapshot):
                ack = acks.get((m.version, m.nonce))
                if ack is None:  # the control plane sends every proxy of a class the same push
                    ack = acks[(m.version, m.nonce)] = encode_frame(Ack(version=m.version, nonce=m.nonce))
                send(proxy, ack)
                size = sizes.get((m.version, m.full))
                if size is None:
                    size = sizes[(m.version, m.full)] = len(encode_frame(m))
                records.append((proxy.index, m.version, m.full, size, time.monotonic(), t_recv))
                acked[m.version] = acked.get(m.version, 0) + 1
                if acked[m.version] == args.count:  # every proxy of this process
                    sys.stdout.write(f"synced {m.version}\n")
                    sys.stdout.flush()
            elif isinstance(m, Welcome):
                heartbeat_interval_s = m.heartbeat_interval_s
                connected += 1
            elif isinstance(m, Error):  # the control plane closes the stream: say why
                raise ProtocolError(m.code, f"from the control plane: {m.message}")
            elif not isinstance(m, Heartbeat):
                raise ProtocolError("UNEXPECTED_MESSAGE", f"{type(m).__name__} on a proxy stream")

    def serve(timeout_s: float) -> None:
        for fd, event in epoll.poll(timeout_s, 4096):
            proxy = streams.get(fd)
            if proxy is None:
                continue
            try:
                if event & select.EPOLLOUT:
                    flush(proxy)
                if event & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    receive(proxy)
            except (OSError, ProtocolError) as e:  # OSError includes ConnectionError
                if not stop[0]:
                    print(f"proxy sim-{proxy.index}: {e}", file=sys.stderr)
                close(proxy)

    next_heartbeat = time.monotonic() + heartbeat_interval_s

    def heartbeat_if_due() -> None:
        # one timer for all streams, from the start: connecting thousands (each decoding a full
        # snapshot) can take longer than the control plane's heartbeat timeout on a busy machine
        nonlocal next_heartbeat
        if time.monotonic() >= next_heartbeat:
            for proxy in list(streams.values()):
                if not proxy.outbox:
                    send(proxy, heartbeat)
            next_heartbeat = time.monotonic() + heartbeat_interval_s

    for start in range(args.first, args.first + args.count, CONNECT_BATCH):
        for index in range(start, min(start + CONNECT_BATCH, args.first + args.count)):
            try:
                sock = socket.create_connection((args.host, args.port), timeout=10)
            except OSError:
                failed += 1
                continue
            sock.setblocking(False)
            proxy = _SimulatedProxy(index, sock, FrameDecoder())
            streams[sock.fileno()] = proxy
            epoll.register(sock, select.EPOLLIN)
            send(proxy, encode_frame(Hello(node_id=f"sim-{index}", namespace=NAMESPACE, labels={
                "app": f"svc{index % args.classes}", "pod": f"sim-{index}"})))
        serve(0.05)
        heartbeat_if_due()
    while not stop[0]:
        serve(max(0.0, min(0.5, next_heartbeat - time.monotonic())))
        heartbeat_if_due()
    for proxy in list(streams.values()):
        close(proxy)
    Path(args.out).write_text(json.dumps({"connected": connected, "failed": failed, "records": records}))
    return 0


class _SimulatedProxy:
    __slots__ = ("decoder", "index", "outbox", "sock")

    def __init__(self, index: int, sock, decoder) -> None:
        self.index = index
        self.sock = sock
        self.decoder = decoder
        self.outbox = bytearray()


# --------------------------------------------------------------------------------------------------
# the driver


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(port: int, message):
    from controlplane.cli import request

    return request(("127.0.0.1", port), message, timeout_s=60)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class SyncWatch:
    """Reads the client processes' "synced VERSION" lines: a version counts as synced when every
    client process has reported it (no proxy-status polling, which would load the control plane)."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.sel = selectors.DefaultSelector()
        self.buf: dict[int, bytes] = {}
        self.seen: dict[str, set[int]] = {}
        self.n = len(procs)
        for k, p in enumerate(procs):
            os.set_blocking(p.stdout.fileno(), False)
            self.sel.register(p.stdout, selectors.EVENT_READ, k)
            self.buf[k] = b""

    def wait(self, timeout_s: float, not_version: str | None = None) -> str | None:
        end = time.monotonic() + timeout_s
        while True:
            for v, ks in self.seen.items():
                if len(ks) == self.n and v != not_version and v not in self.done:
                    self.done.add(v)
                    return v
            left = end - time.monotonic()
            if left <= 0:
                return None
            for key, _ in self.sel.select(left):
                k = key.data
                data = key.fileobj.read() or b""
                self.buf[k] += data
                *lines, self.buf[k] = self.buf[k].split(b"\n")
                for line in lines:
                    if line.startswith(b"synced "):
                        self.seen.setdefault(line[7:].decode(), set()).add(k)

    done: set[str] = set()


class LocalEtcd:
    """A single-member etcd (Debian etcd-server) on free loopback ports, for --replicas without --store."""

    def __init__(self, work: Path) -> None:
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.work = work
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, cores: list[int]) -> "LocalEtcd":
        import urllib.request

        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "bench", "--data-dir", str(self.work / "etcd-data"), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bench={peer}"], stdout=subprocess.DEVNULL, stderr=open(self.work / "etcd.log", "ab"),
            preexec_fn=lambda: os.sched_setaffinity(0, cores))
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{client}/version", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("etcd did not start within 20 s (see etcd.log)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout_s: float, *, signalled: bool = False) -> None:
    """SIGTERM (unless `signalled` already: a second one would kill a client writing its results),
    then SIGKILL after `timeout_s`."""
    if proc.poll() is None and not signalled:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_scale(n: int, args: argparse.Namespace, work: Path) -> dict:
    """`n` proxies spread evenly over `args.replicas` control-plane processes (sharing `store`, an
    etcd URL, when there are several); the change is applied through the first replica."""
    from controlplane.wire import ApplyRequest, Source

    cores = sorted(os.sched_getaffinity(0))
    cp_cores = cores[:1]
    client_cores = cores[1:] or cores
    replicas = args.replicas
    tag = f"{n}x{replicas}"
    config = work / f"config-{tag}"
    config.mkdir()
    for name, text in mesh_yaml(args.services).items():
        (config / name).write_text(text)
    etcd = None
    store = args.store
    if replicas > 1 and store is None:
        etcd = LocalEtcd(work / f"etcd-{tag}")
        (work / f"etcd-{tag}").mkdir()
        etcd.start(client_cores)  # beside the clients: the replicas' core measures the replicas only
        store = etcd.url
    cps: list[subprocess.Popen] = []
    logs = []
    clients: list[subprocess.Popen] = []
    try:
        ports = []
        for r in range(replicas):
            port_file = work / f"cp-{tag}-{r}.port"
            log_path = work / f"cp-{tag}-{r}.log"
            logs.append(log_path)
            profile = ["-m", "cProfile", "-o", f"{args.profile}.{r}" if replicas > 1 else str(args.profile), "-m"] \
                if args.profile else ["-m"]
            cp_cmd = [sys.executable, *profile, "controlplane.cli", "controlplane", "--config", str(config),
                      "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--log-level", "info",
                      "--data-dir", str(work / f"cp-{tag}-{r}-data"),
                      "--heartbeat-interval", "5", "--grace-period", "30",
                      # the simulated proxies speak the plain protocol (no tokens): this measures pushes, not TLS
                      "--insecure-plaintext"]
            if store is not None:
                cp_cmd += ["--store", store, "--poll-interval", str(args.poll_interval)]
            if args.no_delta:
                cp_cmd.append("--no-delta")
            with open(log_path, "wb") as cp_log:
                cps.append(subprocess.Popen(cp_cmd, cwd=REPO, stdout=cp_log, stderr=subprocess.STDOUT,
                                            preexec_fn=lambda: os.sched_setaffinity(0, cp_cores)))
            end = time.monotonic() + 30
            while not port_file.exists() and time.monotonic() < end:
                time.sleep(0.05)
            ports.append(int(port_file.read_text()))
        rss_empty = [_rss_bytes(cp.pid) for cp in cps]
        procs = max(args.client_procs, replicas)
        per = -(-n // procs)
        t_connect = time.monotonic()
        cpu_before_connect = [_cpu_s(cp.pid) for cp in cps]
        outs = []
        for k in range(procs):
            first, count = k * per, min(per, n - k * per)
            if count <= 0:
                break
            out = work / f"client-{tag}-{k}.json"
            outs.append(out)
            clients.append(subprocess.Popen(
                [sys.executable, __file__, "--client", "--host", "127.0.0.1", "--port", str(ports[k % replicas]),
                 "--first", str(first), "--count", str(count), "--classes", str(args.classes), "--out", str(out)],
                cwd=REPO, stdout=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, client_cores)))
        watch = SyncWatch(clients)
        watch.done = set()
        version = watch.wait(args.connect_timeout)
        if version is None:
            raise RuntimeError(f"{n} proxies did not all connect and ACK within {args.connect_timeout}s")
        connect_s = time.monotonic() - t_connect
        connect_cpu_s = sum(_cpu_s(cp.pid) for cp in cps) - sum(cpu_before_connect)
        rss_connected = [_rss_bytes(cp.pid) for cp in cps]
        idle0 = [_cpu_s(cp.pid) for cp in cps]
        time.sleep(args.idle)
        idle_cpu_pct = 100 * (sum(_cpu_s(cp.pid) for cp in cps) - sum(idle0)) / args.idle / replicas  # heartbeats only
        rounds = []
        for r in range(args.rounds):
            weight = 10 + 7 * r  # 10, 17, 24, ...: a different value every round
            cpu0 = [_cpu_s(cp.pid) for cp in cps]
            clients_cpu0 = sum(_cpu_s(c.pid) for c in clients)
            t0 = time.monotonic()
            result = _request(ports[0], ApplyRequest(sources=[Source("change.yaml", vs_yaml(0, weight).encode())]))
            if not result.ok:
                raise RuntimeError(result.error)
            t_applied = time.monotonic()
            new = watch.wait(SETTLE_TIMEOUT_S, not_version=version)
            if new is None:
                raise RuntimeError(f"round {r}: not every proxy ACKed a new version within {SETTLE_TIMEOUT_S}s")
            cpu_per_replica = [_cpu_s(cp.pid) - c0 for cp, c0 in zip(cps, cpu0)]
            clients_cpu = sum(_cpu_s(c.pid) for c in clients) - clients_cpu0
            time.sleep(args.settle)  # quiet time between rounds
            rounds.append({"t0": t0, "apply_s": t_applied - t0, "version": new, "cpu_s": max(cpu_per_replica),
                           "cpu_per_replica_s": cpu_per_replica, "cpu_synced_s": sum(cpu_per_replica),
                           "clients_cpu_s": clients_cpu})
            version = new
        rss_after = [_rss_bytes(cp.pid) for cp in cps]
    finally:
        for c in clients:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in clients:
            _stop(c, 120, signalled=True)  # thousands of streams to close and their records to write, on a busy core
        for cp in cps:
            _stop(cp, 10)
        if etcd is not None:
            etcd.stop()
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    pushes_logged = []
    for log_path in logs:
        for line in log_path.read_text().splitlines():
            if '"push_done"' in line or '"push_started"' in line:
                pushes_logged.append(json.loads(line))
    records = []
    connected = failed = 0
    for out, client in zip(outs, clients):
        if not out.exists():
            raise RuntimeError(f"client process {client.pid} wrote no results (exit status {client.returncode})")
        data = json.loads(out.read_text())
        records += data["records"]
        connected += data["connected"]
        failed += data["failed"]
    full_bytes = [b for (_, _, full, b, _, _) in records if full]
    out_rounds = []
    for rd in rounds:
        mine = [rec for rec in records if rec[1] == rd["version"] and rec[4] >= rd["t0"]]
        acks = {rec[0]: rec[4] for rec in mine}
        sizes = [rec[3] for rec in mine]
        first_recv = min(rec[5] for rec in mine) - rd["t0"]
        lat = [t - rd["t0"] for t in acks.values()]
        out_rounds.append({
            "acks": len(acks),
            "p50_ms": 1000 * _pct(lat, 50),
            "p99_ms": 1000 * _pct(lat, 99),
            "last_ms": 1000 * max(lat),
            "apply_ms": 1000 * rd["apply_s"],
            "first_push_ms": 1000 * first_recv,
            "bytes_per_push": statistics.mean(sizes),
            "cp_cpu_s": rd["cpu_s"],
            "cp_cpu_per_replica_s": rd["cpu_per_replica_s"],
            "cp_cpu_until_synced_s": rd["cpu_synced_s"],
            "clients_cpu_s": rd["clients_cpu_s"],
        })
    return {
        "proxies": n,
        "replicas": replicas,
        "store": "etcd" if store is not None else "none",
        "poll_interval_s": args.poll_interval if store is not None else None,
        "connected": connected,
        "connect_failures": failed,
        "resources": args.services * 5,
        "connect_all_s": connect_s,
        "connect_cpu_s": connect_cpu_s,
        "full_snapshot_bytes": statistics.mean(full_bytes) if full_bytes else 0,
        "idle_cpu_pct": idle_cpu_pct,
        "rss_empty_mb": max(rss_empty) / 2**20,
        "rss_connected_mb": max(rss_connected) / 2**20,
        "rss_after_mb": max(rss_after) / 2**20,
        "rounds": out_rounds,
        "push_log": pushes_logged,
        "loadavg": loadavg,
    }


def report(res: dict) -> None:
    rs = res["rounds"]
    where = (f"across {res['replicas']} control-plane replicas sharing etcd (watched), change applied through "
             "the first" if res["replicas"] > 1 else "on one control plane")
    print(f"\n== {res['proxies']} proxies {where} ({res['connected']} connected, {res['connect_failures']} failed), "
          f"{res['resources']} resources")
    print(f"connect+full sync of all: {res['connect_all_s']:.2f} s, control-plane CPU {res['connect_cpu_s']:.2f} s; "
          f"full snapshot {res['full_snapshot_bytes'] / 1024:.1f} KiB")
    print(f"machine load average at the end: {res['loadavg']} ({os.cpu_count()} cores; other work on the "
          f"machine stretches wall-clock times, not the CPU figures)")
    print(f"control-plane CPU while idle (heartbeats): {res['idle_cpu_pct']:.1f}% of a core")
    print(f"control-plane RSS: {res['rss_empty_mb']:.1f} MiB empty, {res['rss_connected_mb']:.1f} MiB connected, "
          f"{res['rss_after_mb']:.1f} MiB after the rounds")
    print(f"{'round':>5} {'acks':>6} {'p50 ms':>8} {'p99 ms':>8} {'last ms':>8} {'apply ms':>9} {'1st push ms':>11} {'B/push':>8} {'cp CPU s':>9} {'sim CPU s':>9}")
    print("      (cp CPU s: control-plane CPU from the change until every proxy ACKed; sim: the simulated proxies')")
    for i, r in enumerate(rs):
        print(f"{i:>5} {r['acks']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['last_ms']:>8.1f} {r['apply_ms']:>9.1f} {r['first_push_ms']:>11.1f} "
              f"{r['bytes_per_push']:>8.0f} {r['cp_cpu_s']:>9.2f} {r['clients_cpu_s']:>9.2f}")
    med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"median over rounds: p50 {med('p50_ms'):.1f} ms, p99 {med('p99_ms'):.1f} ms, last ACK {med('last_ms'):.1f} ms, "
          f"CPU per change {med('cp_cpu_s'):.2f} s (the busiest replica), simulated proxies {med('clients_cpu_s'):.2f} s")
    if res["replicas"] > 1:
        per = [statistics.median(r["cp_cpu_per_replica_s"][k] for r in rs) for k in range(res["replicas"])]
        print("CPU per change per replica (median over rounds): " + ", ".join(f"{c:.2f} s" for c in per))


def _scale(text: str) -> tuple[int, int]:
    n, _, replicas = text.partition("x")
    return int(n), int(replicas or 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--proxies", type=_scale, nargs="+", default=[(1000, 1), (5000, 1)], metavar="N[xREPLICAS]",
                   help="proxies per run; NxR spreads N proxies over R control-plane replicas sharing etcd")
    p.add_argument("--store", default=None, metavar="etcd://HOST:PORT",
                   help="the etcd replicas share (default: one started here, Debian etcd-server)")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="the replicas' --poll-interval (their config directory; etcd changes come by watch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connect-timeout", type=float, default=180.0,
                   help="seconds for every proxy to connect and ACK its first snapshot")
    p.add_argument("--services", type=int, default=50, help="services in the mesh (5 resources each)")
    p.add_argument("--classes", type=int, default=10, help="distinct proxy label sets")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--settle", type=float, default=1.0, help="quiet seconds between rounds")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle (heartbeats only) CPU measurement")
    p.add_argument("--no-delta", action="store_true", help="control plane pushes full snapshots only")
    p.add_argument("--profile", type=Path, default=None, help="run the control plane under cProfile, stats here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.client:
        return client_main(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(n for n, _ in args.proxies) + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        if min(hard, need) < need:
            print(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        for n, replicas in args.proxies:
            args.replicas = replicas
            res = run_scale(n, args, Path(tmp))
            report(res)
            results.append(res)
            if args.json:  # after each run: a later one that fails keeps the earlier figures
                args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
