"""Installing, re-installing, showing and removing the capture rules in a fresh network namespace."""

from __future__ import annotations

import re
import subprocess

import pytest

from proxy.l4.capture import iptables, rules
from proxy.l4.capture.cli import capture_main
from proxy.l4.capture.lab import Lab
from proxy.l4.capture.rules import CaptureOptions

from .conftest import needs_tool, requires_root

pytestmark = [requires_root, needs_tool("ip", "iproute2"), needs_tool("iptables-restore", "iptables")]

FOREIGN = "*nat\n:OTHER - [0:0]\n-A OUTPUT -p udp -j OTHER\n-A OTHER -p udp -m udp --dport 53 -j RETURN\nCOMMIT\n"


def _saved(lab: Lab, family: int = 4) -> str:
    """iptables-save of the pod namespace, run the way an operator would, without the timestamps."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    text = subprocess.run(lab.argv("pod", [tool, "-t", "nat"]), capture_output=True, text=True, check=True, timeout=30).stdout
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def test_install_shows_exactly_our_chains(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    assert "TRIOMESH" not in _saved(pod_lab)
    options = CaptureOptions(inbound_ports_exclude=(15090, 15021), outbound_ip_ranges_exclude=("198.18.0.0/15",))
    iptables.install(options, netns=ns)
    saved = _saved(pod_lab)
    assert rules.rules_by_chain(saved) == rules.expected_rules_by_chain(options)
    assert iptables.show(netns=ns) == [line for line in saved.splitlines() if "TRIOMESH" in line]


def test_install_twice_is_the_same(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    iptables.restore(FOREIGN, netns=ns)
    iptables.install(CaptureOptions(), netns=ns)
    once = _saved(pod_lab)
    iptables.install(CaptureOptions(), netns=ns)
    assert _saved(pod_lab) == once
    assert once.count("-j TRIOMESH_OUTPUT") == 1 and "-A OUTPUT -p udp -j OTHER" in once


def test_reinstall_with_new_options_replaces(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    iptables.install(CaptureOptions(proxy_port=15001), netns=ns)
    changed = CaptureOptions(proxy_port=16001, outbound_ports_exclude=(53,))
    iptables.install(changed, netns=ns)
    saved = _saved(pod_lab)
    assert rules.rules_by_chain(saved) == rules.expected_rules_by_chain(changed)
    assert "15001" not in saved


def test_remove_leaves_no_trace_and_keeps_foreign_rules(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    iptables.restore(FOREIGN, netns=ns)
    before = _saved(pod_lab)
    iptables.install(CaptureOptions(), netns=ns)
    assert iptables.remove(netns=ns) is not None
    after = _saved(pod_lab)
    assert "TRIOMESH" not in after
    assert after == before
    assert iptables.remove(netns=ns) is None  # nothing left to remove
    assert iptables.show(netns=ns) == []


@pytest.mark.skipif(not iptables.available(6), reason="ip6tables-restore is not installed")
def test_ipv6_install_and_remove(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    options = CaptureOptions(outbound_ip_ranges_exclude=("fd74:6d00::/64", "10.0.0.0/8"))
    iptables.install(options, netns=ns, family=6)
    assert rules.rules_by_chain(_saved(pod_lab, 6)) == rules.expected_rules_by_chain(options, 6)
    assert "TRIOMESH" not in _saved(pod_lab, 4)  # families are separate tables
    iptables.remove(netns=ns, family=6)
    assert "TRIOMESH" not in _saved(pod_lab, 6)


def test_failed_transaction_changes_nothing(pod_lab: Lab) -> None:
    ns = pod_lab.node("pod").netns
    iptables.install(CaptureOptions(), netns=ns)
    before = _saved(pod_lab)
    broken = rules.install_text(CaptureOptions(proxy_port=16001)).replace("COMMIT", "-A TRIOMESH_OUTPUT -j NO_SUCH_CHAIN\nCOMMIT")
    with pytest.raises(iptables.CaptureError, match="exited"):
        iptables.restore(broken, netns=ns)
    assert _saved(pod_lab) == before


def test_cli_install_show_remove_dry_run(pod_lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    ns = pod_lab.node("pod").netns
    assert capture_main(["install", "--netns", ns, "--dry-run", "--exclude-inbound-ports", "22"]) == 0
    dry = capsys.readouterr().out
    assert "-A TRIOMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in dry and "COMMIT" in dry
    assert "TRIOMESH" not in _saved(pod_lab)  # dry run changed nothing

    args = ["--netns", ns, "--proxy-uid", "1500", "--exclude-outbound-cidrs", "10.0.0.0/8,192.168.0.0/16"]
    assert capture_main(["install", *args]) == 0
    capsys.readouterr()
    assert capture_main(["show", "--netns", ns]) == 0
    shown = capsys.readouterr().out
    assert "-A TRIOMESH_OUTPUT -m owner --uid-owner 1500 -j RETURN" in shown
    assert "-A TRIOMESH_OUTPUT -d 192.168.0.0/16 -j RETURN" in shown
    assert capture_main(["remove", "--netns", ns]) == 0
    assert "capture removed" in capsys.readouterr().out
    assert "TRIOMESH" not in _saved(pod_lab)


def test_cli_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert capture_main(["install", "--netns", "tm-no-such-namespace-x", "--proxy-uid", "1500"]) == 1
    assert re.search(r"triomesh capture: .*exited", capsys.readouterr().err)
    assert capture_main(["install", "--exclude-outbound-cidrs", "10.0.0.0/40", "--dry-run"]) == 2
