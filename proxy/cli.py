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
    "validate": ("proxy.config.validate:main", "check Istio config files: every problem with its istioctl analyze code (exit 0, 1 on errors)"),
    "capture": ("proxy.l4.capture.cli:capture_main", "install/remove/show the sidecar traffic capture rules"),
    "lab": ("proxy.l4.capture.lab:lab_main", "network-namespace lab (nodes on a private bridge) for capture tests"),
    "controlplane": ("controlplane.cli:main", "run the control plane: serve Istio config to proxies"),
    "apply": ("controlplane.cli:apply_main", "create or replace resources on the control plane"),
    "delete": ("controlplane.cli:delete_main", "delete resources from the control plane"),
    "proxy-status": ("controlplane.cli:proxy_status_main", "every proxy with the config version it ACKed"),
    "proxy-config": ("controlplane.cli:proxy_config_main", "listeners/routes/clusters one proxy runs"),
}

ACCESS_LOG_FORMATS = ("off", "json", "text", "console")
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


def _controlplane_addresses(text: str):
    from proxy.xds.failover import parse_addresses

    try:
        return parse_addresses(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _duration_s(text: str) -> float:
    """Seconds, as Istio writes durations ("5s", "500ms") or a plain number of seconds."""
    number, scale = (text[:-2], 0.001) if text.endswith("ms") else (text[:-1], 1.0) if text.endswith("s") else (text, 1.0)
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration such as 5s, 500ms or 5, got {text!r}")
    return value


_SIZE_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}


def _size_bytes(text: str) -> int:
    """Bytes, as Kubernetes writes quantities ("512Mi", "1Gi", "500M") or a plain number."""
    for suffix, scale in _SIZE_UNITS.items():
        if text.endswith(suffix):
            number, multiplier = text[: -len(suffix)], scale
            break
    else:
        number, multiplier = text, 1
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 512Mi, 1Gi or 500000000, got {text!r}")
    return int(number) * multiplier


def _percentage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triomesh", description="a service mesh data plane on Trio")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("proxy", help="run the proxy (edge gateway / sidecar) from Istio config")
    p.add_argument("--config", type=Path, default=None,
                   help="a YAML file or a directory of them (with --controlplane: a bootstrap served until the first push)")
    cp = p.add_argument_group("control plane (the proxy gets its config pushed instead of reading files)")
    cp.add_argument("--controlplane", type=_controlplane_addresses, default=None, metavar="HOST:PORT[,HOST:PORT...]",
                    help="address(es) of `triomesh controlplane` replicas (a name may resolve to several); the proxy "
                         "moves to another when its replica goes away")
    cp.add_argument("--node-id", default=None,
                    help="this proxy's unique id (default HOSTNAME.ADMIN_PORT, stable across restarts)")
    cp.add_argument("--controlplane-ca", type=Path, default=None, metavar="FILE",
                    help="the root certificate(s) that verify the control plane's TLS certificate (its CA "
                         "directory's root-cert.pem); required with --controlplane")
    cp.add_argument("--controlplane-plaintext", action="store_true",
                    help="talk to a control plane run with --insecure-plaintext (no TLS, no identity)")
    cp.add_argument("--controlplane-token-file", type=Path, default=None, metavar="FILE",
                    help="a bootstrap token (triomesh controlplane token --namespace NS) proving this proxy may "
                         "take its namespace/service account's identity; renewals use the certificate itself")
    cp.add_argument("--service-account", default="",
                    help="the workload's service account, part of its SPIFFE ID (default: default)")
    cp.add_argument("--register", default=None, metavar="ADDRESS",
                    help="register this workload (with ADDRESS and its labels) as a WorkloadEntry")
    p.add_argument("--namespace", default="default",
                   help="the workload's namespace (default default), with --controlplane, or with --config and "
                        "--label: which DestinationRules and which of several same-named short hosts apply")
    p.add_argument("--label", dest="labels", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="a workload label (repeatable), with --config as with --controlplane: Gateway selectors, "
                        "Sidecar workloadSelectors and sourceLabels match these (with --config and no --label, "
                        "every Gateway and Sidecar applies)")
    p.add_argument("--workload-name", default=None,
                   help="the workload's name in Istio's metrics (source_workload/destination_workload; default: "
                        "its canonical service from the labels, else unknown)")
    p.add_argument("--cluster-id", default="Kubernetes",
                   help="the cluster named in Istio's metrics (source_cluster/destination_cluster; default Kubernetes, "
                        "Istio's default cluster name)")
    p.add_argument("--concurrency", type=_positive, default=None,
                   help="worker processes sharing the listeners with SO_REUSEPORT (default: usable cores)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address the Gateway listeners bind (default 0.0.0.0)")
    p.add_argument("--credentials-dir", default=None, metavar="DIR",
                   help="where Gateway tls.credentialName resolves: DIR/<credentialName>/ holds tls.crt, tls.key "
                        "and, for MUTUAL, ca.crt (a Kubernetes TLS secret's keys; cert/key/cacert also accepted)")
    p.add_argument("--admin-address", type=_host_port, default=("127.0.0.1", 15000),
                   help="HOST:PORT of the admin listener (default 127.0.0.1:15000)")
    p.add_argument("--drain-duration", type=_duration_s, default=5.0, metavar="DURATION",
                   help="on SIGTERM, /quitquitquit or /drain_listeners?graceful: how long connections in flight "
                        "get to finish before they are reset (Istio's terminationDrainDuration; default 5s)")
    p.add_argument("--request-headers-timeout", type=_duration_s, default=10.0, metavar="DURATION",
                   help="a request head that started must be complete within this, else 408 and the connection "
                        "closes (Envoy's request_headers_timeout; default 10s)")
    p.add_argument("--max-downstream-connections", type=_positive, default=None, metavar="N",
                   help="overload manager: HTTP connections a worker holds at most; more are closed at once "
                        "and counted (default: no limit)")
    p.add_argument("--max-worker-rss", type=_size_bytes, default=None, metavar="SIZE",
                   help="overload manager: above this resident memory (e.g. 512Mi) a worker answers new requests "
                        "503 with x-envoy-overloaded until it falls below (default: no limit)")
    p.add_argument("--hot-restart-socket", default=None, metavar="PATH",
                   help="Unix socket of hot restart: a proxy started with the PATH of a running one takes over "
                        "its listening and admin sockets, then the old one drains (docs/hot-restart.md)")
    tr = p.add_argument_group("tracing (Zipkin v2; see docs/tracing.md)")
    tr.add_argument("--zipkin-address", type=_host_port, default=None, metavar="HOST:PORT",
                    help="Zipkin collector spans are posted to (POST /api/v2/spans); without it, no tracing")
    tr.add_argument("--trace-sampling", type=_percentage, default=1.0, metavar="PERCENT",
                    help="percentage of requests sampled when no Telemetry resource and no incoming decision "
                         "says otherwise (Istio's meshConfig.defaultConfig.tracing.sampling; default 1)")
    p.add_argument("--access-log", choices=ACCESS_LOG_FORMATS, default="json", help="access log format: json, text (Envoy's default format, as Istio prints it), console, off (default json)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="json", help="format of the proxy's own log lines")

    for name, (_, help_text) in DELEGATED.items():
        d = sub.add_parser(name, help=help_text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse, with the checks that involve several flags (argparse exits with status 2 on errors)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.command == "proxy" and args.config is None and args.controlplane is None:
        parser.error("proxy: --config or --controlplane is required")
    if args.command == "proxy" and args.controlplane is not None:
        if args.controlplane_plaintext and (args.controlplane_ca or args.controlplane_token_file):
            # a token sent in plaintext could be read on the way and used by anyone
            parser.error("proxy: --controlplane-plaintext contradicts --controlplane-ca and --controlplane-token-file")
        if not args.controlplane_plaintext and args.controlplane_ca is None:
            parser.error("proxy: --controlplane needs --controlplane-ca FILE (the control plane's root-cert.pem; "
                         "the protocol is TLS) or, for a control plane run with --insecure-plaintext, "
                         "--controlplane-plaintext")
    return args


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
        credentials_dir=os.path.abspath(args.credentials_dir) if args.credentials_dir else None,
        admin_host=args.admin_address[0],
        admin_port=args.admin_address[1],
        access_log=args.access_log,
        log_level=args.log_level,
        log_format=args.log_format,
        controlplane=args.controlplane,
        node_id=args.node_id,
        namespace=args.namespace,
        labels=dict(args.labels),
        workload_name=args.workload_name,
        cluster_id=args.cluster_id,
        register=args.register,
        drain_duration_s=args.drain_duration,
        request_headers_timeout_s=args.request_headers_timeout,
        max_downstream_connections=args.max_downstream_connections,
        zipkin_address=args.zipkin_address,
        trace_sampling_percent=args.trace_sampling,
        max_worker_rss_bytes=args.max_worker_rss,
        hot_restart_socket=args.hot_restart_socket,
        service_account=args.service_account,
        controlplane_ca=args.controlplane_ca,
        controlplane_token_file=args.controlplane_token_file,
    )
    log.info("starting", concurrency=options.concurrency, config=str(options.config_path) if options.config_path else None,
             controlplane=",".join(map(str, args.controlplane)) if args.controlplane else None, pid=os.getpid())
    return trio.run(serve, options, log)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # delegated subcommands parse their own arguments, --help included
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = parse_args(argv)
    if args.command == "proxy":
        return run_proxy(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
