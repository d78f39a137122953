"""The netns lab: nodes reach each other by name, and teardown leaves no namespace, link or file behind."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from proxy.l4.capture import lab as labmod
from proxy.l4.capture.lab import LabError, lab_main, lab_up, open_lab

from .conftest import needs_tool, requires_root

pytestmark = [requires_root, needs_tool("ip", "iproute2")]


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _namespaces_of(run_id: str) -> set[str]:
    """The namespaces of one run (other runs, e.g. a parallel test session, are none of our business)."""
    return {name for name in _netns_names() if name.startswith(f"tm-{run_id}-")}


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=30).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def test_up_connects_nodes_and_down_removes_everything() -> None:
    links_before = _host_links()
    with open_lab(["client", "server"]) as lab:
        names = {n.netns for n in lab.nodes.values()} | {lab.hub_netns}
        assert names == _namespaces_of(lab.run_id)
        assert len(names) == 3
        links = subprocess.run(lab.argv("client", ["ip", "-o", "addr", "show", "dev", "eth0"]), capture_output=True, text=True, check=True, timeout=30).stdout
        assert "198.18.0.10/24" in links and "fd74:6d00::a/64" in links
        hosts = subprocess.run(lab.argv("client", ["getent", "hosts", "server"]), capture_output=True, text=True, check=True, timeout=30).stdout
        assert hosts.split()[0] in (lab.node("server").ipv4, lab.node("server").ipv6)
        # a real TCP exchange across the bridge, in both families
        for family, ip in ((socket.AF_INET, lab.node("server").ipv4), (socket.AF_INET6, lab.node("server").ipv6)):
            with lab.socket("server", family) as listener, lab.socket("client", family) as client:
                listener.bind((ip, 0))
                listener.listen(1)
                listener.settimeout(5)
                client.settimeout(5)
                client.connect((ip, listener.getsockname()[1]))
                accepted, peer = listener.accept()
                with accepted:
                    accepted.settimeout(5)
                    assert peer[0] == (lab.node("client").ipv4 if family == socket.AF_INET else lab.node("client").ipv6)
                    client.sendall(b"over the bridge")
                    assert accepted.recv(100) == b"over the bridge"
        # lab addresses exist only inside its namespaces, never in the host's
        assert lab.node("server").ipv4 not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    assert _namespaces_of(lab.run_id) == set()
    assert _host_links() - links_before == set()  # nothing was ever made in the host's namespace
    assert not any(p.name.startswith(f"tm-{lab.run_id}-") for p in labmod.NETNS_ETC.glob("*"))


def test_failure_inside_the_lab_still_tears_down() -> None:
    with pytest.raises(RuntimeError, match="test failed here"):
        with open_lab(["a"]) as lab:
            assert lab.node("a").netns in _netns_names()
            raise RuntimeError("test failed here")
    assert _namespaces_of(lab.run_id) == set()


def test_failure_half_way_through_building_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # the namespaces, bridge and veths are made for real; then writing the hosts files fails
    run_id = labmod.new_run_id()
    made: list[set[str]] = []

    def fail_after_links(lab: labmod.Lab) -> None:
        made.append(_namespaces_of(lab.run_id))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(labmod, "_write_hosts_files", fail_after_links)
    with pytest.raises(OSError, match="No space"):
        lab_up(["a", "b"], run_id=run_id)
    assert made == [{f"tm-{run_id}-hub", f"tm-{run_id}-a", f"tm-{run_id}-b"}]
    assert _namespaces_of(run_id) == set()


def test_refusals_create_nothing() -> None:
    with open_lab(["a"]) as first:
        with pytest.raises(LabError, match="in use"):
            lab_up(["b"], run_id=first.run_id)
        assert _namespaces_of(first.run_id) == {first.hub_netns, first.node("a").netns}  # untouched
    for bad in (
        lambda run_id: lab_up(["x", "y"], run_id=run_id, subnet_v4="198.18.0.0/33"),
        lambda run_id: lab_up(["dup", "dup"], run_id=run_id),
        lambda run_id: lab_up(["Bad_Name"], run_id=run_id),
        lambda run_id: lab_up(["hub"], run_id=run_id),
    ):
        run_id = labmod.new_run_id()
        with pytest.raises((LabError, ValueError)):
            bad(run_id)
        assert _namespaces_of(run_id) == set()
    with pytest.raises(LabError, match="bad run id"):
        lab_up(["a"], run_id="../etc")


def test_cli_up_and_down(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_main(["up", "web", "db", "--no-ipv6"]) == 0
    state = json.loads(capsys.readouterr().out)
    run_id = state["run_id"]
    try:
        assert {n["name"] for n in state["nodes"]} == {"web", "db"}
        assert all(n["ipv6"] is None for n in state["nodes"])
        assert {n["netns"] for n in state["nodes"]} <= _netns_names()
        assert lab_main(["list"]) == 0
        assert run_id in capsys.readouterr().out.split()
    finally:
        assert lab_main(["down", run_id]) == 0
    assert "removed 3 namespaces" in capsys.readouterr().out
    assert _namespaces_of(run_id) == set()
    assert lab_main(["down"]) == 2
