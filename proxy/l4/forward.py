"""A standalone L4 forwarder process: listen, then tcp_proxy every connection to a fixed upstream or
to its SO_ORIGINAL_DST (a minimal transparent outbound sidecar).

Used by the capture end-to-end test and bench/l4_bench.py; the full proxy runner wires the same
pieces through its config instead. Prints one JSON line when listening and one per finished
connection on stdout, so a parent process can follow it.

    python -m proxy.l4.forward --listen 127.0.0.1:0 --upstream 127.0.0.1:8080 [--mode copy]
    python -m proxy.l4.forward --listen 0.0.0.0:15001 --original-dst --run-as-uid 1337
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import trio

from proxy.l4.addrs import UpstreamAddr, parse_host_port
from proxy.l4.original_dst import TransparentConnection, open_listener, serve_transparent
from proxy.l4.tcp_proxy import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_BULK_PIPE_BYTES,
    DEFAULT_PIPE_BYTES,
    CopyMode,
    TcpProxyResult,
    TcpProxyStats,
    proxy_to_upstream,
)
from proxy.stats import Stats


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid for good (after binding): sockets we open later are owned by `uid`, which is
    what iptables' `-m owner --uid-owner` matches to keep the proxy's own traffic out of capture."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _result_event(conn: TransparentConnection, result: TcpProxyResult, upstream: UpstreamAddr | None) -> dict:
    return {
        "event": "connection",
        "client": str(conn.client),
        "orig_dst": str(conn.orig_dst),
        "redirected": conn.redirected,
        "upstream": str(upstream) if upstream else None,
        "bytes_downstream_to_upstream": result.bytes_downstream_to_upstream,
        "bytes_upstream_to_downstream": result.bytes_upstream_to_downstream,
        "mode": result.mode.value,
        "error": type(result.error).__name__ if result.error else None,
        "response_flag": result.error.response_flag if result.error else "-",
    }


async def run(args: argparse.Namespace) -> None:
    host, port = parse_host_port(args.listen)
    listener = open_listener(host, port)
    if args.run_as_uid is not None:
        drop_privileges(args.run_as_uid, args.run_as_gid if args.run_as_gid is not None else args.run_as_uid)
    mode = CopyMode(args.mode) if args.mode else None
    fixed = UpstreamAddr(*parse_host_port(args.upstream)) if args.upstream else None
    stats = Stats()
    cluster_stats = TcpProxyStats(stats, "passthrough" if fixed is None else str(fixed))

    async def handle(conn: TransparentConnection) -> None:
        if fixed is not None:
            upstream = fixed
        elif conn.redirected:
            upstream = UpstreamAddr(conn.orig_dst.ip, conn.orig_dst.port)
        else:
            # dialled us directly: forwarding to our own address would loop forever
            _emit({"event": "refused", "client": str(conn.client), "reason": "not redirected"})
            return
        result = await proxy_to_upstream(
            conn.sock,
            upstream,
            connect_timeout_s=args.connect_timeout_s,
            idle_timeout_s=args.idle_timeout_s or None,
            mode=mode,
            stats=cluster_stats,
            pipe_bytes=args.pipe_bytes,
            bulk_pipe_bytes=args.bulk_pipe_bytes,
            bind_ip=args.bind_source,
        )
        if not args.quiet:
            _emit(_result_event(conn, result, upstream))

    with listener:
        bound = listener.getsockname()
        _emit({"event": "listening", "ip": bound[0], "port": bound[1], "pid": os.getpid(), "uid": os.getuid()})
        await serve_transparent(listener, handle, max_connections=args.max_connections or math.inf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.l4.forward", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any free port)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--upstream", help="HOST:PORT to forward every connection to")
    target.add_argument("--original-dst", action="store_true", help="forward to each connection's SO_ORIGINAL_DST")
    parser.add_argument("--mode", choices=[m.value for m in CopyMode], help="splice (default on Linux) or copy")
    parser.add_argument("--pipe-bytes", type=int, default=DEFAULT_PIPE_BYTES, help="splice pipe capacity at first")
    parser.add_argument(
        "--bulk-pipe-bytes", type=int, default=DEFAULT_BULK_PIPE_BYTES, help="grown to after 1 MiB in one direction"
    )
    parser.add_argument("--connect-timeout-s", type=float, default=DEFAULT_CONNECT_TIMEOUT_S)
    parser.add_argument("--idle-timeout-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S, help="0: no idle timeout")
    parser.add_argument("--bind-source", help="source IP for upstream connections (127.0.0.6: inbound passthrough)")
    parser.add_argument("--run-as-uid", type=int, help="drop to this uid after binding (capture exclusion)")
    parser.add_argument("--run-as-gid", type=int, help="and this gid (default: same as uid)")
    parser.add_argument("--max-connections", type=int, default=0, help="exit after this many (0: never)")
    parser.add_argument("--quiet", action="store_true", help="no per-connection lines")
    args = parser.parse_args(argv)
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
