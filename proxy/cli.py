"""The `triomesh` command: `proxy` runs the proxy, `validate` checks config, others delegate.

Subcommands implemented elsewhere are named here as "module:function" taking argv and returning an
exit code, and imported only when used, so `triomesh proxy` does not pay for them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

DELEGATED = {
    "validate": ("proxy.config.validate:main", "check Istio config files (exit 0, or the precise error)"),
    "capture": ("proxy.l4.capture.cli:capture_main", "install/remove/show the sidecar traffic capture rules"),
}

ACCESS_LOG_FORMATS = ("off", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


def default_concurrency() -> int:
    """Cores this process may run on (a `taskset` pin counts), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triomesh", description="a service mesh data plane on Trio")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("proxy", help="run the proxy (edge gateway / sidecar) from Istio config")
    p.add_argument("--config", required=True, type=Path, help="a YAML file or a directory of them")
    p.add_argument("--concurrency", type=_positive, default=None,
                   help="worker processes sharing the listeners with SO_REUSEPORT (default: usable cores)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address the Gateway listeners bind (default 0.0.0.0)")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 15000),
                   help="HOST:PORT of the admin listener (default 127.0.0.1:15000)")
    p.add_argument("--access-log", choices=ACCESS_LOG_FORMATS, default="json", help="access log format (default json)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="json", help="format of the proxy's own log lines")

    for name, (_, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _delegate(name: str, argv: Sequence[str]) -> int:
    target, _ = DELEGATED[name]
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(list(argv)) or 0)


def run_proxy(args: argparse.Namespace) -> int:
    import trio

    from proxy import logging as tm_logging
    from proxy.runner.supervisor import ProxyOptions, serve

    tm_logging.configure(level=args.log_level, fmt=args.log_format, process="supervisor")
    log = tm_logging.get_logger("triomesh.supervisor")
    options = ProxyOptions(
        config_path=args.config,
        concurrency=args.concurrency or default_concurrency(),
        bind_address=args.bind_address,
        admin_host=args.admin_address[0],
        admin_port=args.admin_address[1],
        access_log=args.access_log,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    log.info("starting", concurrency=options.concurrency, config=str(options.config_path), pid=os.getpid())
    return trio.run(serve, options, log)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # delegated subcommands parse their own arguments, --help included
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "proxy":
        return run_proxy(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
