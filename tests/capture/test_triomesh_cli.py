"""`triomesh lab` and `triomesh capture` through the real command line (the `triomesh` entry point's
module), as an operator would type them: a lab with an extra hosts line, capture installed, shown and
removed in one of its namespaces, then the lab taken down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyroute2 import netns

from .conftest import needs_tool, requires_root

pytestmark = [requires_root, needs_tool("ip", "iproute2"), needs_tool("iptables-restore", "iptables")]

REPO = Path(__file__).resolve().parents[2]


def triomesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False)


def test_lab_and_capture_from_the_command_line() -> None:
    up = triomesh("lab", "up", "app", "db", "--no-ipv6", "--host", "svc=198.18.0.200")
    assert up.returncode == 0, up.stderr
    lab = json.loads(up.stdout)
    run_id = lab["run_id"]
    try:
        app_ns = lab["nodes"][0]["netns"]
        hosts = subprocess.run(["ip", "netns", "exec", app_ns, "getent", "hosts", "svc", "db"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.split()
        assert hosts[:2] == ["198.18.0.200", "svc"] and hosts[2:4] == [lab["nodes"][1]["ipv4"], "db"]

        assert triomesh("capture", "install", "--netns", app_ns, "--proxy-uid", "1337").returncode == 0
        shown = triomesh("capture", "show", "--netns", app_ns)
        assert shown.returncode == 0
        assert "-A TRIOMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in shown.stdout
        assert "-A TRIOMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in shown.stdout
        removed = triomesh("capture", "remove", "--netns", app_ns)
        assert removed.returncode == 0 and "capture removed" in removed.stdout
        assert triomesh("capture", "show", "--netns", app_ns).stdout == ""
        assert run_id in triomesh("lab", "list").stdout.split()
    finally:
        down = triomesh("lab", "down", run_id)
    assert down.returncode == 0, down.stderr
    assert not [n for n in netns.listnetns() if n.startswith(f"tm-{run_id}-")]
    assert run_id not in triomesh("lab", "list").stdout.split()


def test_bad_host_option_is_refused_and_creates_nothing() -> None:
    before = set(netns.listnetns())
    bad = triomesh("lab", "up", "app", "--host", "svc")
    assert bad.returncode == 1 and "NAME=IP" in bad.stderr
    assert set(netns.listnetns()) == before
