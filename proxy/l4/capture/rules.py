"""Build the nat-table rules that send a pod's TCP traffic through its sidecar, as iptables-restore text.

Pure: options in, text out. Same shape and semantics as istio-iptables (Istio's `pilot-agent
istio-iptables` with its default REDIRECT mode), with our own chain names:

    PREROUTING -p tcp -> TRIOMESH_INBOUND      inbound: everything arriving for the pod
      excluded inbound ports                   -> RETURN (the app gets them directly)
      otherwise (or only the listed ports)     -> TRIOMESH_IN_REDIRECT -> REDIRECT :15006
    OUTPUT -p tcp -> TRIOMESH_OUTPUT           outbound: everything the pod's processes open
      excluded outbound ports                  -> RETURN
      from 127.0.0.6 on lo                     -> RETURN (the sidecar's inbound passthrough source)
      proxy uid/gid, on lo, to a non-127.0.0.1 -> TRIOMESH_IN_REDIRECT (the app calling its own pod
                                                  IP through the sidecar: treat as inbound)
      others on lo                             -> RETURN (app <-> itself over loopback)
      proxy uid/gid                            -> RETURN (the sidecar's own upstream connections:
                                                  without this they would be captured again, a loop)
      to 127.0.0.1                             -> RETURN
      excluded outbound CIDRs                  -> RETURN
      included CIDRs (or everything for "*")   -> TRIOMESH_REDIRECT -> REDIRECT :15001

The text is written in the exact form `iptables-save` prints, so what we install can be compared
line by line with what the kernel reports (tests rely on it). Only TCP is captured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Literal

CHAIN_OUTPUT = "TRIOMESH_OUTPUT"
CHAIN_REDIRECT = "TRIOMESH_REDIRECT"
CHAIN_INBOUND = "TRIOMESH_INBOUND"
CHAIN_IN_REDIRECT = "TRIOMESH_IN_REDIRECT"
OUR_CHAINS = (CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTPUT, CHAIN_REDIRECT)
CHAIN_PREFIX = "TRIOMESH_"

# The built-in chains we hook, with the jump rule we add to each (iptables-save form).
JUMP_RULES = (
    ("PREROUTING", f"-A PREROUTING -p tcp -j {CHAIN_INBOUND}"),
    ("OUTPUT", f"-A OUTPUT -p tcp -j {CHAIN_OUTPUT}"),
)

Family = Literal[4, 6]


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """istio-iptables flags, same meaning (Istio's flag in the comment)."""

    proxy_port: int = 15001  # -p: outbound capture port
    inbound_capture_port: int = 15006  # -z: inbound capture port
    proxy_uid: str = "1337"  # -u: uid(s) of the proxy, comma separated
    proxy_gid: str = "1337"  # -g: gid(s) of the proxy, comma separated ("" to skip gid rules)
    inbound_intercepted_ports: str = "*"  # -b: "*" = all, "" = no inbound capture, or "80,443"
    inbound_ports_exclude: tuple[int, ...] = ()  # -d: with "*", ports left alone
    outbound_ip_ranges_include: str = "*"  # -i: "*" = all, "" = none, or "10.0.0.0/8,..."
    outbound_ip_ranges_exclude: tuple[str, ...] = ()  # -x: CIDRs never captured
    outbound_ports_exclude: tuple[int, ...] = ()  # -o: destination ports never captured
    inbound_passthrough_source_v4: str = "127.0.0.6"  # the sidecar's source for inbound passthrough
    inbound_passthrough_source_v6: str = "::6"

    def __post_init__(self) -> None:
        for port in (self.proxy_port, self.inbound_capture_port, *self.inbound_ports_exclude, *self.outbound_ports_exclude):
            if not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        for cidr in (*self.outbound_ip_ranges_exclude, *_split(self.outbound_ip_ranges_include, keep_star=False)):
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError with the offending text
        for port in _split(self.inbound_intercepted_ports, keep_star=False):
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad inbound port: {port!r}")
        for ident in (*_split(self.proxy_uid), *_split(self.proxy_gid)):
            if not ident.isdigit():
                raise ValueError(f"uid/gid must be numeric: {ident!r}")


def _split(text: str, *, keep_star: bool = True) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items if keep_star else [t for t in items if t != "*"]


def _cidr(text: str) -> str:
    """iptables-save spells networks normalised with a prefix length: 10.1.2.3 -> 10.1.2.3/32."""
    return str(ipaddress.ip_network(text, strict=False))


def _family_of(cidr: str) -> int:
    return ipaddress.ip_network(cidr, strict=False).version


def chain_rules(options: CaptureOptions, family: Family = 4) -> list[str]:
    """The `-A` lines of our four chains, in order (iptables-save form)."""
    o = options
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    passthrough_src = _cidr(o.inbound_passthrough_source_v4 if family == 4 else o.inbound_passthrough_source_v6)
    rules: list[str] = []
    add = rules.append

    # inbound
    inbound_ports = _split(o.inbound_intercepted_ports)
    if "*" in inbound_ports:
        for port in sorted(set(o.inbound_ports_exclude)):
            add(f"-A {CHAIN_INBOUND} -p tcp -m tcp --dport {port} -j RETURN")
        add(f"-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}")
    else:
        for port in inbound_ports:
            add(f"-A {CHAIN_INBOUND} -p tcp -m tcp --dport {int(port)} -j {CHAIN_IN_REDIRECT}")
    add(f"-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {o.inbound_capture_port}")

    # outbound
    for port in sorted(set(o.outbound_ports_exclude)):
        add(f"-A {CHAIN_OUTPUT} -p tcp -m tcp --dport {port} -j RETURN")
    add(f"-A {CHAIN_OUTPUT} -s {passthrough_src} -o lo -j RETURN")
    for kind, ident in [("uid", u) for u in _split(o.proxy_uid)] + [("gid", g) for g in _split(o.proxy_gid)]:
        add(f"-A {CHAIN_OUTPUT} ! -d {loopback} -o lo -m owner --{kind}-owner {ident} -j {CHAIN_IN_REDIRECT}")
        add(f"-A {CHAIN_OUTPUT} -o lo -m owner ! --{kind}-owner {ident} -j RETURN")
        add(f"-A {CHAIN_OUTPUT} -m owner --{kind}-owner {ident} -j RETURN")
    add(f"-A {CHAIN_OUTPUT} -d {loopback} -j RETURN")
    for cidr in o.outbound_ip_ranges_exclude:
        if _family_of(cidr) == family:
            add(f"-A {CHAIN_OUTPUT} -d {_cidr(cidr)} -j RETURN")
    includes = _split(o.outbound_ip_ranges_include)
    if "*" in includes:
        add(f"-A {CHAIN_OUTPUT} -j {CHAIN_REDIRECT}")
    else:
        for cidr in includes:
            if _family_of(cidr) == family:
                add(f"-A {CHAIN_OUTPUT} -d {_cidr(cidr)} -j {CHAIN_REDIRECT}")
    add(f"-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {o.proxy_port}")
    return rules


def install_text(
    options: CaptureOptions, family: Family = 4, *, existing_jumps: Iterable[str] = ()
) -> str:
    """iptables-restore input (for `--noflush`) that installs our rules in one transaction.

    Declaring a chain (`:NAME - [0:0]`) in a --noflush restore creates it or empties it, so our
    chains are rebuilt in place. The jump rules in the built-in chains are not ours to flush, so
    any already present (`existing_jumps`, lines from iptables-save) are deleted first: installing
    twice yields the same rules, and changed options replace the old ones atomically.
    """
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in OUR_CHAINS]
    lines += ["-D" + jump[2:] for jump in existing_jumps]
    lines += [rule for _, rule in JUMP_RULES]
    lines += chain_rules(options, family)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_text(existing_jumps: Iterable[str], existing_chains: Iterable[str]) -> str:
    """iptables-restore input (for `--noflush`) removing our jump rules, then emptying and deleting
    our chains (a chain can only be deleted once nothing refers to it and it is empty)."""
    chains = list(existing_chains)
    lines = ["*nat"]
    lines += ["-D" + jump[2:] for jump in existing_jumps]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def rules_by_chain(save_text: str) -> dict[str, list[str]]:
    """Our part of an `iptables-save -t nat` output: for each chain that is ours or jumps to us,
    its rules touching us in order; our declared chains appear even when empty."""
    out: dict[str, list[str]] = {chain: [] for chain in chains_of_ours(save_text)}
    for line in save_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-A" and CHAIN_PREFIX in line:
            out.setdefault(parts[1], []).append(line)
    return out


def expected_rules_by_chain(options: CaptureOptions, family: Family = 4) -> dict[str, list[str]]:
    """What rules_by_chain(iptables-save) must be right after installing `options`."""
    out: dict[str, list[str]] = {chain: [] for chain in OUR_CHAINS}
    for chain, rule in JUMP_RULES:
        out.setdefault(chain, []).append(rule)
    for rule in chain_rules(options, family):
        out[rule.split()[1]].append(rule)
    return out


def jumps_to_us(save_text: str) -> list[str]:
    """`-A <built-in chain> ... -j TRIOMESH_*` lines of an iptables-save output."""
    jumps = []
    for line in save_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-A" and not parts[1].startswith(CHAIN_PREFIX) and f"-j {CHAIN_PREFIX}" in line:
            jumps.append(line)
    return jumps


def chains_of_ours(save_text: str) -> list[str]:
    """Names of our chains declared in an iptables-save output."""
    return [line[1:].split()[0] for line in save_text.splitlines() if line.startswith(":" + CHAIN_PREFIX)]
