"""The iptables-restore text for given capture options (pure)."""

from __future__ import annotations

import pytest

from proxy.l4.capture import rules
from proxy.l4.capture.rules import CaptureOptions, chain_rules, install_text, remove_text

DEFAULT_V4 = [
    "-A TRIOMESH_INBOUND -p tcp -j TRIOMESH_IN_REDIRECT",
    "-A TRIOMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A TRIOMESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A TRIOMESH_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j TRIOMESH_IN_REDIRECT",
    "-A TRIOMESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A TRIOMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A TRIOMESH_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j TRIOMESH_IN_REDIRECT",
    "-A TRIOMESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A TRIOMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A TRIOMESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A TRIOMESH_OUTPUT -j TRIOMESH_REDIRECT",
    "-A TRIOMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
]


def test_defaults_match_istio_layout() -> None:
    assert chain_rules(CaptureOptions()) == DEFAULT_V4


def test_install_text_is_one_transaction() -> None:
    text = install_text(CaptureOptions())
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and text.count("COMMIT") == 1
    assert lines[1:5] == [
        ":TRIOMESH_INBOUND - [0:0]",
        ":TRIOMESH_IN_REDIRECT - [0:0]",
        ":TRIOMESH_OUTPUT - [0:0]",
        ":TRIOMESH_REDIRECT - [0:0]",
    ]
    assert lines[5:7] == ["-A PREROUTING -p tcp -j TRIOMESH_INBOUND", "-A OUTPUT -p tcp -j TRIOMESH_OUTPUT"]
    assert lines[7:-1] == DEFAULT_V4


def test_reinstall_deletes_existing_jumps_first() -> None:
    existing = ["-A OUTPUT -p tcp -j TRIOMESH_OUTPUT", "-A OUTPUT -p tcp -j TRIOMESH_OUTPUT"]
    lines = install_text(CaptureOptions(), existing_jumps=existing).splitlines()
    deletes = [i for i, line in enumerate(lines) if line.startswith("-D")]
    adds = [i for i, line in enumerate(lines) if line == "-A OUTPUT -p tcp -j TRIOMESH_OUTPUT"]
    assert [lines[i] for i in deletes] == ["-D OUTPUT -p tcp -j TRIOMESH_OUTPUT"] * 2
    assert max(deletes) < min(adds) and len(adds) == 1


def test_ports_uid_and_cidrs() -> None:
    options = CaptureOptions(
        proxy_port=16001,
        inbound_capture_port=16006,
        proxy_uid="1500",
        proxy_gid="",
        inbound_ports_exclude=(15090, 22, 22),
        outbound_ports_exclude=(53,),
        outbound_ip_ranges_exclude=("169.254.169.254", "10.0.0.0/8", "fd00::/8"),
    )
    got = chain_rules(options)
    assert got[:3] == [
        "-A TRIOMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A TRIOMESH_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A TRIOMESH_INBOUND -p tcp -j TRIOMESH_IN_REDIRECT",
    ]
    assert "-A TRIOMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in got
    assert got[-1] == "-A TRIOMESH_REDIRECT -p tcp -j REDIRECT --to-ports 16001"
    out = [r for r in got if r.startswith("-A TRIOMESH_OUTPUT")]
    assert out[0] == "-A TRIOMESH_OUTPUT -p tcp -m tcp --dport 53 -j RETURN"  # port exclusions come first
    assert "-A TRIOMESH_OUTPUT -m owner --uid-owner 1500 -j RETURN" in out
    assert not any("gid-owner" in r for r in got)
    # CIDR exclusions sit after the owner/loopback rules, before the catch-all redirect; v6 ones left out
    assert out[-3:] == [
        "-A TRIOMESH_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A TRIOMESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
        "-A TRIOMESH_OUTPUT -j TRIOMESH_REDIRECT",
    ]
    assert not any("fd00" in r for r in got)
    assert "-A TRIOMESH_OUTPUT -d fd00::/8 -j RETURN" in chain_rules(options, 6)


def test_included_cidrs_replace_the_catch_all() -> None:
    got = chain_rules(CaptureOptions(outbound_ip_ranges_include="10.96.0.0/12,10.244.0.0/16,fd00::/8"))
    assert "-A TRIOMESH_OUTPUT -j TRIOMESH_REDIRECT" not in got
    assert got[-3:] == [
        "-A TRIOMESH_OUTPUT -d 10.96.0.0/12 -j TRIOMESH_REDIRECT",
        "-A TRIOMESH_OUTPUT -d 10.244.0.0/16 -j TRIOMESH_REDIRECT",
        "-A TRIOMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ]
    none = chain_rules(CaptureOptions(outbound_ip_ranges_include=""))
    assert not any(r.endswith("-j TRIOMESH_REDIRECT") for r in none)


def test_inbound_port_list_and_no_inbound() -> None:
    listed = chain_rules(CaptureOptions(inbound_intercepted_ports="9080,8443"))
    assert [r for r in listed if r.startswith("-A TRIOMESH_INBOUND")] == [
        "-A TRIOMESH_INBOUND -p tcp -m tcp --dport 9080 -j TRIOMESH_IN_REDIRECT",
        "-A TRIOMESH_INBOUND -p tcp -m tcp --dport 8443 -j TRIOMESH_IN_REDIRECT",
    ]
    off = chain_rules(CaptureOptions(inbound_intercepted_ports=""))
    assert not any(r.startswith("-A TRIOMESH_INBOUND") for r in off)


def test_ipv6_uses_v6_loopback_and_passthrough_source() -> None:
    got = chain_rules(CaptureOptions(), 6)
    assert "-A TRIOMESH_OUTPUT -s ::6/128 -o lo -j RETURN" in got
    assert "-A TRIOMESH_OUTPUT -d ::1/128 -j RETURN" in got
    assert not any("127.0.0." in r for r in got)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"proxy_port": 0},
        {"inbound_ports_exclude": (70000,)},
        {"outbound_ip_ranges_exclude": ("10.0.0.0/33",)},
        {"outbound_ip_ranges_include": "not-a-cidr"},
        {"inbound_intercepted_ports": "http"},
        {"proxy_uid": "istio-proxy"},
    ],
)
def test_bad_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CaptureOptions(**kwargs)


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables) on Tue Nov 24 15:50:10 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TRIOMESH_INBOUND - [0:0]
:TRIOMESH_IN_REDIRECT - [0:0]
:TRIOMESH_OUTPUT - [0:0]
:TRIOMESH_REDIRECT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j TRIOMESH_INBOUND
-A OUTPUT -p udp -j OTHER
-A OUTPUT -p tcp -j TRIOMESH_OUTPUT
-A TRIOMESH_INBOUND -p tcp -j TRIOMESH_IN_REDIRECT
-A TRIOMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRIOMESH_OUTPUT -j TRIOMESH_REDIRECT
-A TRIOMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""


def test_parsing_iptables_save() -> None:
    assert rules.jumps_to_us(SAVED) == ["-A PREROUTING -p tcp -j TRIOMESH_INBOUND", "-A OUTPUT -p tcp -j TRIOMESH_OUTPUT"]
    assert rules.chains_of_ours(SAVED) == ["TRIOMESH_INBOUND", "TRIOMESH_IN_REDIRECT", "TRIOMESH_OUTPUT", "TRIOMESH_REDIRECT"]
    by_chain = rules.rules_by_chain(SAVED)
    assert by_chain["OUTPUT"] == ["-A OUTPUT -p tcp -j TRIOMESH_OUTPUT"]  # the foreign rule is not ours
    assert "OTHER" not in by_chain


def test_remove_text_order() -> None:
    text = remove_text(rules.jumps_to_us(SAVED), rules.chains_of_ours(SAVED))
    lines = text.splitlines()
    assert lines[1:3] == ["-D PREROUTING -p tcp -j TRIOMESH_INBOUND", "-D OUTPUT -p tcp -j TRIOMESH_OUTPUT"]
    flushes = [i for i, line in enumerate(lines) if line.startswith("-F ")]
    deletes = [i for i, line in enumerate(lines) if line.startswith("-X ")]
    assert len(flushes) == len(deletes) == 4 and max(flushes) < min(deletes)
    assert "OTHER" not in text
