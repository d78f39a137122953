"""A network-namespace lab: named nodes on one private L2 segment, for capture tests and demos.

Topology (all made with pyroute2 over netlink, no shell):

    tm-<run>-hub   a namespace holding only a linux bridge `br0`
    tm-<run>-<n>   one namespace per node: `lo` up, `eth0` = one end of a veth pair whose other end
                   sits in the hub namespace, enslaved to br0

Each node gets 198.18.0.<10+i>/24 and fd74:6d00::<10+i>/64. 198.18.0.0/15 is the RFC 2544
benchmarking range and fd74:6d00::/64 a unique-local prefix; neither is routed anywhere, and they
only ever exist inside the namespaces made here (there is no link to the host's namespace), so a
lab cannot clash with the host or, since each run has its own namespaces, with another lab.
/etc/netns/<ns>/hosts maps node names to addresses; `ip netns exec` bind-mounts it on /etc/hosts.

Names carry a random run id, so concurrent runs never collide, and teardown finds everything by
that id: `Lab.down()` (also run by the context manager, and by `lab_up` itself if building fails)
removes the namespaces, which destroys their veth ends and the bridge, then the hosts files.
Processes still running in a namespace keep its network alive after its name is gone: stop yours
before `down`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from pyroute2 import NetNS, netns

LAB_PREFIX = "tm-"
HUB = "hub"
DEFAULT_SUBNET_V4 = "198.18.0.0/24"
DEFAULT_SUBNET_V6 = "fd74:6d00::/64"
_FIRST_HOST = 10
_NODE_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")
_IFA_F_NODAD = 0x02  # linux/if_addr.h: usable at once, no duplicate address detection wait
NETNS_ETC = Path("/etc/netns")
STATE_DIR = Path("/run/triomesh/labs")


class LabError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LabNode:
    name: str  # logical name, also its host name inside the lab
    netns: str  # network namespace name (`ip netns exec <netns> ...`)
    ipv4: str
    ipv6: str | None


@dataclass(slots=True)
class Lab:
    run_id: str
    hub_netns: str
    nodes: dict[str, LabNode] = field(default_factory=dict)
    extra_hosts: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> LabNode:
        return self.nodes[name]

    def argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """Command line running `argv` inside a node's namespace (with its hosts file)."""
        return ["ip", "netns", "exec", self.nodes[node].netns, *argv]

    def socket(self, node: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket living in a node's namespace, usable from this process."""
        return socket_in(self.nodes[node].netns, family, kind)

    def namespaces(self) -> list[str]:
        return [self.hub_netns, *(n.netns for n in self.nodes.values())]

    def down(self) -> None:
        teardown(self.run_id)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _netns_name(run_id: str, node: str) -> str:
    return f"{LAB_PREFIX}{run_id}-{node}"


def new_run_id() -> str:
    return secrets.token_hex(3)


def lab_up(
    node_names: Sequence[str],
    *,
    run_id: str | None = None,
    subnet_v4: str = DEFAULT_SUBNET_V4,
    subnet_v6: str | None = DEFAULT_SUBNET_V6,
    extra_hosts: Mapping[str, str] | None = None,
) -> Lab:
    """Create the namespaces, bridge, veths, addresses and hosts files. Cleans up if anything fails.

    `extra_hosts` adds name -> address lines to every node's hosts file (e.g. a service's virtual IP,
    which no node holds: the capture rules divert connections to it before they leave the node)."""
    names = list(node_names)
    for name in names:
        if not _NODE_NAME.fullmatch(name) or name == HUB:
            raise LabError(f"bad node name {name!r}: lowercase letters, digits, '-', not {HUB!r}")
    if len(set(names)) != len(names):
        raise LabError("node names must be unique")
    run_id = run_id or new_run_id()
    if not re.fullmatch(r"[a-z0-9]{1,12}", run_id):
        raise LabError(f"bad run id {run_id!r}")
    net4 = ipaddress.ip_network(subnet_v4)
    net6 = ipaddress.ip_network(subnet_v6) if subnet_v6 else None
    if len(names) + _FIRST_HOST >= net4.num_addresses - 1:
        raise LabError(f"{subnet_v4} is too small for {len(names)} nodes")
    taken = [n for n in netns.listnetns() if n.startswith(_netns_name(run_id, ""))]
    if taken:  # someone else's run: refuse before creating anything, so our cleanup cannot touch it
        raise LabError(f"run id {run_id} is in use: {', '.join(taken)}")
    for name, address in (extra_hosts or {}).items():
        ipaddress.ip_address(address)  # ValueError on junk, before anything is created
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
            raise LabError(f"bad host name {name!r}")
    lab = Lab(run_id=run_id, hub_netns=_netns_name(run_id, HUB), extra_hosts=dict(extra_hosts or {}))
    try:
        _create_namespace(lab.hub_netns)
        with NetNS(lab.hub_netns, flags=0) as hub:
            _set_up(hub, "lo")
            hub.link("add", ifname="br0", kind="bridge")
            bridge = hub.link_lookup(ifname="br0")[0]
            hub.link("set", index=bridge, state="up")
            for i, name in enumerate(names):
                node = LabNode(
                    name=name,
                    netns=_netns_name(run_id, name),
                    ipv4=str(net4.network_address + _FIRST_HOST + i),
                    ipv6=str(net6.network_address + _FIRST_HOST + i) if net6 else None,
                )
                _create_namespace(node.netns)
                lab.nodes[name] = node
                port = f"p{i}"
                # create the pair in the hub with the peer end born inside the node's namespace
                hub.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": node.netns})
                hub.link("set", index=hub.link_lookup(ifname=port)[0], master=bridge, state="up")
                with NetNS(node.netns, flags=0) as ns:
                    _set_up(ns, "lo")
                    eth0 = ns.link_lookup(ifname="eth0")[0]
                    ns.addr("add", index=eth0, address=node.ipv4, prefixlen=net4.prefixlen)
                    if node.ipv6 and net6:
                        ns.addr("add", index=eth0, address=node.ipv6, prefixlen=net6.prefixlen, flags=_IFA_F_NODAD)
                    ns.link("set", index=eth0, state="up")
        _write_hosts_files(lab)
    except BaseException:
        teardown(run_id)
        raise
    return lab


@contextmanager
def open_lab(node_names: Sequence[str], **kwargs: object) -> Iterator[Lab]:
    """`with open_lab(["app", "server"]) as lab:` ... always torn down, whatever happens inside."""
    lab = lab_up(node_names, **kwargs)  # type: ignore[arg-type]
    try:
        yield lab
    finally:
        lab.down()


def teardown(run_id: str) -> list[str]:
    """Remove every namespace and hosts file of a run. Idempotent; returns the namespaces removed."""
    if not re.fullmatch(r"[a-z0-9]{1,12}", run_id):
        raise LabError(f"bad run id {run_id!r}")
    prefix = f"{LAB_PREFIX}{run_id}-"
    removed = []
    for name in netns.listnetns():
        if name.startswith(prefix):
            try:
                netns.remove(name)
                removed.append(name)
            except OSError:
                pass  # already gone
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            if entry.name.startswith(prefix):
                shutil.rmtree(entry, ignore_errors=True)
    (STATE_DIR / f"{run_id}.json").unlink(missing_ok=True)
    return removed


def socket_in(netns_name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Create a socket inside a named namespace (a socket keeps the namespace it was born in).

    pyroute2 forks a short-lived child that enters the namespace and passes the fd back, so this
    process's own threads never switch namespace.
    """
    return netns.create_socket(netns_name, family=family, socket_type=kind, flags=0)


def _create_namespace(name: str) -> None:
    if name in netns.listnetns():
        raise LabError(f"namespace {name} already exists")
    netns.create(name)


def _set_up(ipr: NetNS, ifname: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def _write_hosts_files(lab: Lab) -> None:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for node in lab.nodes.values():
        lines.append(f"{node.ipv4}\t{node.name}")
        if node.ipv6:
            lines.append(f"{node.ipv6}\t{node.name}")
    for name, address in lab.extra_hosts.items():
        lines.append(f"{address}\t{name}")
    text = "\n".join(lines) + "\n"
    for node in lab.nodes.values():
        directory = NETNS_ETC / node.netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text(text)


# --- CLI: `triomesh lab up|down|list` -------------------------------------------------------------


def _save_state(lab: Lab) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{lab.run_id}.json"
    path.write_text(json.dumps({"run_id": lab.run_id, "hub_netns": lab.hub_netns, "nodes": [asdict(n) for n in lab.nodes.values()],
                                "extra_hosts": lab.extra_hosts}))
    return path


def _saved_run_ids() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))


def lab_main(argv: Sequence[str] | None = None) -> int:
    """`triomesh lab up [NODE ...] | down RUN_ID... | down --all | list`."""
    parser = argparse.ArgumentParser(prog="triomesh lab", description="network-namespace lab for capture tests")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create a lab; prints its run id, namespaces and addresses as JSON")
    up.add_argument("nodes", nargs="*", default=["app", "server"], help="node names (default: app server)")
    up.add_argument("--run-id", help="use this run id instead of a random one")
    up.add_argument("--subnet-v4", default=DEFAULT_SUBNET_V4)
    up.add_argument("--no-ipv6", action="store_true")
    up.add_argument("--host", action="append", default=[], metavar="NAME=IP",
                    help="extra hosts-file line in every node (e.g. a service VIP); repeatable")
    down = sub.add_parser("down", help="remove labs made by `lab up`")
    down.add_argument("run_ids", nargs="*")
    down.add_argument("--all", action="store_true", help="every lab recorded by `lab up` on this host")
    sub.add_parser("list", help="labs recorded by `lab up`")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("triomesh lab: needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.command == "up":
        try:
            extra = {}
            for item in args.host:
                name, sep, ip = item.partition("=")
                if not sep:
                    raise LabError(f"--host wants NAME=IP, got {item!r}")
                extra[name] = ip
            lab = lab_up(args.nodes, run_id=args.run_id, subnet_v4=args.subnet_v4,
                         subnet_v6=None if args.no_ipv6 else DEFAULT_SUBNET_V6, extra_hosts=extra)
        except (LabError, OSError, ValueError) as exc:
            print(f"triomesh lab up: {exc}", file=sys.stderr)
            return 1
        _save_state(lab)
        print(json.dumps({"run_id": lab.run_id, "hub_netns": lab.hub_netns, "nodes": [asdict(n) for n in lab.nodes.values()]}, indent=2))
        return 0
    if args.command == "down":
        run_ids = _saved_run_ids() if args.all else args.run_ids
        if not run_ids:
            print("triomesh lab down: give run ids or --all", file=sys.stderr)
            return 2
        for run_id in run_ids:
            removed = teardown(run_id)
            print(f"{run_id}: removed {len(removed)} namespaces")
        return 0
    for run_id in _saved_run_ids():
        print(run_id)
    return 0


if __name__ == "__main__":
    sys.exit(lab_main())
