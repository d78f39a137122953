"""Command-line entry points of the control plane: `triomesh controlplane`, `apply`, `delete`,
`proxy-status`, `proxy-config`. Each takes argv (without the subcommand) and returns an exit code.

Also runnable as `python -m controlplane.cli SUBCOMMAND ARGS...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_ADDRESS = "127.0.0.1:15010"  # istiod's plaintext xDS port
ADDRESS_ENV = "TRIOMESH_CONTROLPLANE"
REQUEST_TIMEOUT_S = 30.0


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


# --------------------------------------------------------------------------------------------------
# triomesh controlplane


def controlplane_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triomesh controlplane",
                                description="serve Istio config to proxies over the triomesh control-plane protocol")
    p.add_argument("--config", type=Path, default=None, help="a directory of Istio YAML to watch (optional)")
    p.add_argument("--listen", type=_host_port, default=_host_port(DEFAULT_ADDRESS),
                   help=f"HOST:PORT to listen on (default {DEFAULT_ADDRESS}; port 0 picks one)")
    p.add_argument("--heartbeat-interval", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="heartbeat period; a stream silent for 3 periods is closed (default 10)")
    p.add_argument("--grace-period", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long a disconnected proxy stays registered (default 30)")
    p.add_argument("--debounce", type=_positive_float, default=0.1, metavar="SECONDS",
                   help="quiet time that ends a burst of changes before a push (default 0.1)")
    p.add_argument("--debounce-max", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="longest a change waits for its push during a steady stream of changes (default 1)")
    p.add_argument("--poll-interval", type=_positive_float, default=1.0, metavar="SECONDS")
    p.add_argument("--push-concurrency", type=int, default=256)
    p.add_argument("--no-delta", action="store_true", help="always push full snapshots")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the bound port here once listening (useful with port 0)")
    return p


def main(argv: Sequence[str]) -> int:
    args = controlplane_parser().parse_args(list(argv))
    import trio

    from controlplane.server import ControlPlane, ServerOptions
    from controlplane.store import ConfigStore
    from proxy import logging as tm_logging
    from proxy.config.errors import ConfigError

    tm_logging.configure(level=args.log_level, fmt=args.log_format, process="controlplane")
    log = tm_logging.get_logger("triomesh.controlplane")
    store = ConfigStore(args.config)
    try:
        store.load_directory()
    except ConfigError as e:
        log.error("config_rejected", source="directory", error=str(e))
        return 1
    options = ServerOptions(
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=3 * args.heartbeat_interval,
        grace_period_s=args.grace_period,
        debounce_quiet_s=args.debounce,
        debounce_max_s=max(args.debounce, args.debounce_max),
        poll_interval_s=args.poll_interval,
        push_concurrency=max(1, args.push_concurrency),
        delta=not args.no_delta,
    )
    plane = ControlPlane(store, options, log)

    async def run() -> int:
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(plane.serve, args.listen[0], args.listen[1])
            except OSError as e:
                log.error("listen_failed", address=f"{args.listen[0]}:{args.listen[1]}", error=str(e))
                return 1
            if args.port_file is not None:
                tmp = args.port_file.with_suffix(".tmp")
                tmp.write_text(f"{port}\n")
                tmp.replace(args.port_file)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("shutting_down", signal=signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(run)


# --------------------------------------------------------------------------------------------------
# CLI requests: apply, delete, proxy-status


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlplane", type=_host_port, default=None,
                   help=f"HOST:PORT of the control plane (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")


def _address(args: argparse.Namespace) -> tuple[str, int]:
    if args.controlplane is not None:
        return args.controlplane
    return _host_port(os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS))


def request(address: tuple[str, int], message, *, timeout_s: float = REQUEST_TIMEOUT_S):
    """Send one request message on a new stream and return the reply (a blocking helper for CLIs)."""
    import trio

    from controlplane.framed import connect

    async def run():
        with trio.fail_after(timeout_s):
            framed = await connect(*address)
            try:
                await framed.send(message)
                return await framed.receive()
            finally:
                await framed.aclose()

    return trio.run(run)


def _read_sources(paths: list[Path]) -> list:
    from controlplane.wire import Source
    from proxy.config.load import config_files

    sources = []
    for path in paths:
        if str(path) == "-":
            sources.append(Source("<stdin>", sys.stdin.buffer.read()))
            continue
        for f in config_files(path):
            sources.append(Source(str(f), f.read_bytes()))
    return sources


def _change_main(argv: Sequence[str], op: str) -> int:
    from controlplane.framed import StreamClosed
    from controlplane.wire import ApplyRequest, ApplyResult, DeleteRequest, Error, ProtocolError
    from proxy.config.errors import ConfigError

    p = argparse.ArgumentParser(prog=f"triomesh {op}",
                                description=f"{op} Istio resources on the control plane (kubectl-style)")
    p.add_argument("-f", "--filename", dest="files", type=Path, action="append", required=True,
                   help="a YAML file, a directory of them, or - for stdin (repeatable)")
    _address_arg(p)
    args = p.parse_args(list(argv))
    address = _address(args)
    try:
        sources = _read_sources(args.files)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    message = ApplyRequest(sources=sources) if op == "apply" else DeleteRequest(sources=sources)
    try:
        reply = request(address, message)
    except (OSError, StreamClosed, ProtocolError, Exception) as e:  # noqa: BLE001 - report and fail
        print(f"error: control plane at {address[0]}:{address[1]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if isinstance(reply, Error):
        print(f"error: {reply.code}: {reply.message}", file=sys.stderr)
        return 1
    if not isinstance(reply, ApplyResult):
        print(f"error: unexpected reply {type(reply).__name__}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"error: {reply.error}", file=sys.stderr)
        return 1
    for word, names in (("created", reply.created), ("configured", reply.configured),
                        ("unchanged", reply.unchanged), ("deleted", reply.deleted)):
        for name in names:
            print(f"{name} {word}")
    print(f"config version {reply.config_version}")
    return 0


def apply_main(argv: Sequence[str]) -> int:
    return _change_main(argv, "apply")


def delete_main(argv: Sequence[str]) -> int:
    return _change_main(argv, "delete")


def proxy_status_main(argv: Sequence[str]) -> int:
    import msgspec

    from controlplane.wire import StatusReply, StatusRequest

    p = argparse.ArgumentParser(prog="triomesh proxy-status",
                                description="every proxy the control plane knows, with the config version it has ACKed")
    _address_arg(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = p.parse_args(list(argv))
    address = _address(args)
    try:
        reply = request(address, StatusRequest())
    except Exception as e:  # noqa: BLE001
        print(f"error: control plane at {address[0]}:{address[1]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not isinstance(reply, StatusReply):
        print(f"error: unexpected reply {type(reply).__name__}", file=sys.stderr)
        return 1
    if args.output == "json":
        sys.stdout.write(msgspec.json.encode(reply).decode() + "\n")
        return 0
    rows = [("NAME", "NAMESPACE", "ADDRESS", "STATUS", "ACKED", "SENT", "LAST NACK")]
    for s in reply.proxies:
        if not s.connected:
            status = "DISCONNECTED"
        elif s.sent_version and s.sent_version == s.acked_version:
            status = "SYNCED"
        elif s.last_nack_version and s.last_nack_version == s.sent_version:
            status = "NACKED"
        else:
            status = "STALE"
        rows.append((s.node_id, s.namespace, s.address, status, s.acked_version or "-", s.sent_version or "-",
                     (s.last_nack[:80] if s.last_nack else "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"control plane config version {reply.config_version}, {len(reply.proxies)} proxies")
    return 0


def _admin_address(target: str, args: argparse.Namespace) -> tuple[str, int] | str:
    """HOST:PORT given directly, or the admin address a connected proxy announced; else an error text."""
    try:
        return _host_port(target)
    except argparse.ArgumentTypeError:
        pass
    from controlplane.wire import StatusReply, StatusRequest

    address = _address(args)
    try:
        reply = request(address, StatusRequest())
    except Exception as e:  # noqa: BLE001
        return f"control plane at {address[0]}:{address[1]}: {type(e).__name__}: {e}"
    if not isinstance(reply, StatusReply):
        return f"unexpected reply {type(reply).__name__}"
    for p in reply.proxies:
        if p.node_id == target:
            if not p.admin_address:
                return f"proxy {target!r} did not announce an admin address"
            return _host_port(p.admin_address)
    return f"no proxy {target!r} is known to the control plane"


def _fetch_config_dump(admin: tuple[str, int]) -> dict:
    import http.client

    import msgspec

    conn = http.client.HTTPConnection(admin[0], admin[1], timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", "/config_dump")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"/config_dump answered {resp.status}")
        return msgspec.json.decode(body)
    finally:
        conn.close()


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _match_text(matches: list) -> str:
    parts = []
    for m in matches:
        for field in ("uri", "method", "authority", "scheme"):
            v = m.get(field)
            if isinstance(v, dict) and v:
                ((kind, value),) = list(v.items())[:1]
                parts.append(f"{field} {kind} {value}")
        for name, v in (m.get("headers") or {}).items():
            parts.append(f"header {name}" + (f" {next(iter(v))} {next(iter(v.values()))}" if v else ""))
    return ", ".join(parts) or "/*"


def proxy_config_main(argv: Sequence[str]) -> int:
    import msgspec

    p = argparse.ArgumentParser(prog="triomesh proxy-config",
                                description="what one proxy runs, from its admin endpoint's /config_dump")
    p.add_argument("section", choices=("listeners", "routes", "clusters", "all"))
    p.add_argument("proxy", help="a node id known to the control plane, or the proxy's admin HOST:PORT")
    _address_arg(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = p.parse_args(list(argv))
    admin = _admin_address(args.proxy, args)
    if isinstance(admin, str):
        print(f"error: {admin}", file=sys.stderr)
        return 1
    try:
        dump = _fetch_config_dump(admin)
    except (OSError, msgspec.DecodeError) as e:
        print(f"error: admin endpoint {admin[0]}:{admin[1]}: {e}", file=sys.stderr)
        return 1
    config = dump.get("config") or {}
    if args.output == "json":
        out = config if args.section == "all" else config.get("clusters" if args.section == "clusters" else "listeners", [])
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out), indent=2).decode() + "\n")
        return 0
    blocks = []
    if args.section in ("listeners", "all"):
        rows = [("NAME", "ADDRESS", "PORT", "PROTOCOL", "DIRECTION", "OWNER")]
        for lst in config.get("listeners", []):
            rows.append((lst["name"], lst["address"], str(lst["port"]), lst["protocol"], lst.get("traffic_direction", ""),
                         lst.get("owner", "")))
        blocks.append(_table(rows))
    if args.section in ("routes", "all"):
        rows = [("LISTENER", "VIRTUAL HOST", "DOMAINS", "MATCH", "DESTINATIONS", "VIRTUAL SERVICE")]
        for lst in config.get("listeners", []):
            for vh in lst.get("virtual_hosts", []):
                for r in vh.get("routes", []):
                    dests = ", ".join(f"{d['cluster']} {d['weight']}%" for d in r.get("destinations", []))
                    rows.append((lst["name"], vh["name"], ",".join(vh.get("domains", [])[:3])
                                 + (",..." if len(vh.get("domains", [])) > 3 else ""),
                                 _match_text(r.get("match", [])), dests, r.get("virtual_service") or "-"))
        blocks.append(_table(rows))
    if args.section in ("clusters", "all"):
        rows = [("NAME", "LB", "ENDPOINTS")]
        for c in config.get("clusters", []):
            eps = ", ".join(f"{e['address']}:{e['port']}" for e in c.get("endpoints", []))
            rows.append((c["name"], c.get("lb_policy", ""), eps or "-"))
        blocks.append(_table(rows))
    print("\n\n".join(blocks))
    print(f"\nconfig version {dump.get('version', '')}")
    return 0


COMMANDS = {
    "controlplane": main,
    "apply": apply_main,
    "delete": delete_main,
    "proxy-status": proxy_status_main,
    "proxy-config": proxy_config_main,
}


def _module_main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m controlplane.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return int(COMMANDS[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
