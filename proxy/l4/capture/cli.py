"""`triomesh capture install|remove|show`: the sidecar's traffic capture rules, from the command line.

Flag names follow istio-iptables' long options where there is one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from proxy.l4.capture import iptables, rules
from proxy.l4.capture.rules import CaptureOptions


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated ports, got {text!r}") from None


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triomesh capture", description="install the sidecar's iptables capture rules")
    parser.add_argument("command", choices=["install", "remove", "show"])
    parser.add_argument("--netns", help="network namespace name (`ip netns list`); default: our own")
    parser.add_argument("--ipv6", action="store_true", help="also ip6tables (when installed)")
    parser.add_argument("--dry-run", action="store_true", help="print the iptables-restore input, change nothing")
    d = CaptureOptions()
    parser.add_argument("--proxy-port", type=int, default=d.proxy_port, help="outbound capture port (istio -p)")
    parser.add_argument("--inbound-capture-port", type=int, default=d.inbound_capture_port, help="istio -z")
    parser.add_argument("--proxy-uid", default=d.proxy_uid, help="uid(s) whose traffic is never captured (istio -u)")
    parser.add_argument("--proxy-gid", default=d.proxy_gid, help="gid(s) likewise (istio -g); '' for none")
    parser.add_argument("--inbound-intercepted-ports", default=d.inbound_intercepted_ports, help="'*', '' or list (istio -b)")
    parser.add_argument("--exclude-inbound-ports", type=_ports, default=(), help="istio -d")
    parser.add_argument("--include-outbound-cidrs", default=d.outbound_ip_ranges_include, help="'*' or list (istio -i)")
    parser.add_argument("--exclude-outbound-cidrs", type=_cidrs, default=(), help="istio -x")
    parser.add_argument("--exclude-outbound-ports", type=_ports, default=(), help="istio -o")
    return parser


def options_from_args(args: argparse.Namespace) -> CaptureOptions:
    return CaptureOptions(
        proxy_port=args.proxy_port,
        inbound_capture_port=args.inbound_capture_port,
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        inbound_intercepted_ports=args.inbound_intercepted_ports,
        inbound_ports_exclude=args.exclude_inbound_ports,
        outbound_ip_ranges_include=args.include_outbound_cidrs,
        outbound_ip_ranges_exclude=args.exclude_outbound_cidrs,
        outbound_ports_exclude=args.exclude_outbound_ports,
    )


def capture_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    families: list[rules.Family] = [4]
    if args.ipv6:
        if iptables.available(6):
            families.append(6)
        else:
            print("triomesh capture: ip6tables-restore not found, IPv6 left alone", file=sys.stderr)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"triomesh capture: {exc}", file=sys.stderr)
        return 2
    try:
        for family in families:
            tool = "iptables" if family == 4 else "ip6tables"
            if args.command == "install":
                if args.dry_run:
                    # without root or the namespace, still show what would be applied on a clean table
                    try:
                        text = iptables.install_plan(options, netns=args.netns, family=family)
                    except iptables.CaptureError:
                        text = rules.install_text(options, family)
                    print(f"# {tool}-restore --noflush" + (f" (netns {args.netns})" if args.netns else ""))
                    sys.stdout.write(text)
                else:
                    iptables.install(options, netns=args.netns, family=family)
                    print(f"{tool}: capture installed" + (f" in netns {args.netns}" if args.netns else ""))
            elif args.command == "remove":
                if args.dry_run:
                    current = iptables.save_nat(netns=args.netns, family=family)
                    print(f"# {tool}-restore --noflush")
                    sys.stdout.write(rules.remove_text(rules.jumps_to_us(current), rules.chains_of_ours(current)))
                else:
                    text = iptables.remove(netns=args.netns, family=family)
                    print(f"{tool}: " + ("capture removed" if text else "nothing to remove"))
            else:
                for line in iptables.show(netns=args.netns, family=family):
                    print(line)
    except BrokenPipeError:  # `triomesh capture show | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except iptables.CaptureError as exc:
        print(f"triomesh capture: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(capture_main())
