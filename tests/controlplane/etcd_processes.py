"""Real etcd for the control-plane tests (Debian's etcd-server): one or three members on free loopback
ports with their data directories under the test's temporary directory; restartable on the same ports
and data; stopped by PID."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.runner.harness import free_port


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def post(port: int, path: str, body: dict, timeout_s: float = 1.0) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


class EtcdMember:
    def __init__(self, tmp: Path, name: str) -> None:
        self.name = name
        self.data = tmp / f"etcd-{name}"
        self.client_port, self.peer_port = free_port(), free_port()
        self.log = tmp / f"etcd-{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        # a short election timeout: a killed leader is replaced within about a second
        self.proc = subprocess.Popen(
            ["etcd", "--name", self.name, "--data-dir", str(self.data), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", self.peer_url,
             "--initial-advertise-peer-urls", self.peer_url, "--initial-cluster", initial_cluster,
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        """`/v3/maintenance/status`: its own id (header.member_id) and the leader's. Raises OSError."""
        return post(self.client_port, "/v3/maintenance/status", {})

    def answers(self) -> bool:
        try:
            post(self.client_port, "/v3/kv/range", {"key": base64.b64encode(b"x").decode()})
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class EtcdCluster:
    """`size` members forming one cluster; `start` waits until a quorum answers reads."""

    def __init__(self, tmp: Path, size: int = 1) -> None:
        self.members = [EtcdMember(tmp, f"m{i}") for i in range(size)]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self) -> EtcdCluster:
        for m in self.members:
            if not m.running():
                m.start(self.initial_cluster)
        wait_until(lambda: all(m.answers() for m in self.members), timeout_s=20, what="etcd members answering")
        return self

    def leader(self) -> EtcdMember:
        """The member the others agree leads (asked through the JSON gateway)."""
        def agreed():
            by_id, leaders = {}, set()
            for m in self.members:
                if not m.running():
                    continue
                try:
                    status = m.status()
                except OSError:
                    return None
                by_id[status["header"]["member_id"]] = m
                leaders.add(status.get("leader"))
            return by_id.get(leaders.pop()) if len(leaders) == 1 else None
        return wait_until(agreed, what="an etcd leader")

    def kill(self) -> None:
        for m in self.members:
            m.kill()

    stop = kill
