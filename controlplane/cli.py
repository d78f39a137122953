"""Command-line entry points of the control plane: `triomesh controlplane` (and its `token` and `ca`
subcommands), `apply`, `delete`, `proxy-status`, `proxy-config`. Each takes argv (without the
subcommand) and returns an exit code.

Also runnable as `python -m controlplane.cli SUBCOMMAND ARGS...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_ADDRESS = "127.0.0.1:15010"  # istiod's xDS port (plaintext there; TLS here unless --insecure-plaintext)
ADDRESS_ENV = "TRIOMESH_CONTROLPLANE"
CONTROLPLANE_CA_ENV = "TRIOMESH_CONTROLPLANE_CA"  # the root that verifies a TLS control plane
TOKEN_FILE_ENV = "TRIOMESH_TOKEN_FILE"  # the admin token for apply/delete/status
CA_DIR_ENV = "TRIOMESH_CA_DIR"
DATA_DIR_ENV = "TRIOMESH_DATA_DIR"
REQUEST_TIMEOUT_S = 30.0


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _duration_s(text: str) -> float:
    """Seconds, written as Istio durations: 24h, 90m, 10s, 500ms, or a plain number of seconds."""
    units = (("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0))
    scale = 1.0
    number = text
    for suffix, factor in units:
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], factor
            break
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration such as 24h, 10s or 500ms, got {text!r}")
    return value


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
                                description="serve Istio config to proxies over the triomesh control-plane protocol "
                                            "(also: `triomesh controlplane token ...` makes bootstrap/admin tokens, "
                                            "`triomesh controlplane ca show|rotate|switch-signer|drop-old-roots` inspects the CA or rotates its root)")
    p.add_argument("--config", type=Path, default=None, help="a directory of Istio YAML to watch (optional)")
    p.add_argument("--listen", type=_host_port, default=_host_port(DEFAULT_ADDRESS),
                   help=f"HOST:PORT to listen on (default {DEFAULT_ADDRESS}; port 0 picks one)")
    p.add_argument("--ui-address", type=_host_port, default=None, metavar="HOST:PORT",
                   help="serve the mesh view (service graph and proxy-status, read-only, no authentication) "
                        "on HOST:PORT; off by default (docs/mesh-view.md)")
    p.add_argument("--ui-port-file", type=Path, default=None, help="write the mesh view's bound port here")
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
    p.add_argument("--store", default=None, metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="share applied resources and proxy registrations with other replicas through etcd v3 "
                        "(its JSON gateway); the data directory keeps a copy (docs/controlplane-durability.md)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where applied resources, registered workloads and the config version are kept across "
                        f"restarts (docs/controlplane-durability.md; default ${DATA_DIR_ENV} or {default_data_dir()})")
    ca = p.add_argument_group("certificate authority and TLS (docs/identity.md)")
    ca.add_argument("--ca-dir", type=Path, default=None,
                    help="the CA directory: Istio's plug-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem, "
                         "cert-chain.pem), or a new self-signed root written there on first start "
                         f"(default ${CA_DIR_ENV} or DATA_DIR/ca)")
    ca.add_argument("--trust-domain", default=None, help="the SPIFFE trust domain (default cluster.local)")
    ca.add_argument("--workload-cert-ttl", type=_duration_s, default=None, metavar="DURATION",
                    help="lifetime of workload certificates (default 24h)")
    ca.add_argument("--tls-san", dest="tls_sans", action="append", default=[], metavar="NAME",
                    help="a DNS name or IP address for the control plane's own certificate (repeatable; "
                         "default: the listen address (the host name for 0.0.0.0 or ::), localhost and 127.0.0.1)")
    ca.add_argument("--tokens-file", type=Path, default=None,
                    help="bootstrap and admin tokens (default CA_DIR/tokens.json)")
    ca.add_argument("--insecure-plaintext", action="store_true",
                    help="no CA and no TLS: the plaintext, unauthenticated protocol, where anyone who can reach "
                         "the port reads and changes the mesh's config (development and tests only)")
    return p


def _data_dir_default() -> Path:
    return Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else default_data_dir()


def _ca_dir_default(data_dir: Path | None = None) -> Path:
    """$TRIOMESH_CA_DIR, else the data directory's `ca`."""
    return Path(os.environ[CA_DIR_ENV]) if os.environ.get(CA_DIR_ENV) else (data_dir or _data_dir_default()) / "ca"


def default_data_dir() -> Path:
    """Where the control plane keeps its state unless told: the user's state directory (XDG)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "triomesh"


def default_ca_dir() -> Path:
    """The CA directory inside the default data directory."""
    return default_data_dir() / "ca"


def _security_options(args: argparse.Namespace):
    from controlplane.security import SecurityOptions
    from controlplane.ca import DEFAULT_WORKLOAD_CERT_TTL_S
    from proxy.identity.spiffe import DEFAULT_TRUST_DOMAIN

    import socket

    host = args.listen[0]
    # a wildcard address is no name a peer dials: the host's name stands for it
    dialled = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    sans = tuple(args.tls_sans) or (dialled, "localhost", "127.0.0.1")
    return SecurityOptions(ca_dir=args.ca_dir, trust_domain=args.trust_domain or DEFAULT_TRUST_DOMAIN,
                           workload_cert_ttl_s=args.workload_cert_ttl or DEFAULT_WORKLOAD_CERT_TTL_S,
                           server_hosts=sans, tokens_file=args.tokens_file)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in CONTROLPLANE_SUBCOMMANDS:
        return CONTROLPLANE_SUBCOMMANDS[argv[0]](argv[1:])
    args = controlplane_parser().parse_args(argv)
    if args.insecure_plaintext:
        for flag, value in (("--ca-dir", args.ca_dir), ("--trust-domain", args.trust_domain),
                            ("--workload-cert-ttl", args.workload_cert_ttl), ("--tls-san", args.tls_sans),
                            ("--tokens-file", args.tokens_file)):
            if value:
                controlplane_parser().error(f"{flag} contradicts --insecure-plaintext (no CA, no TLS)")
    args.data_dir = args.data_dir or _data_dir_default()
    if not args.insecure_plaintext and args.ca_dir is None:
        args.ca_dir = _ca_dir_default(args.data_dir)
    import trio

    from controlplane.server import ControlPlane, ServerOptions
    from controlplane.store import ConfigStore
    from proxy import logging as tm_logging
    from proxy.config.errors import ConfigError

    tm_logging.configure(level=args.log_level, fmt=args.log_format, process="controlplane")
    log = tm_logging.get_logger("triomesh.controlplane")
    from controlplane.durable import DataDirectory, StoreError

    try:
        data = DataDirectory(args.data_dir).open()
    except StoreError as e:
        log.error("data_dir_rejected", data_dir=str(args.data_dir), error=str(e))
        return 1
    client = None
    if args.store is not None:
        from controlplane.etcd import EtcdClient, parse_store_url

        try:
            client = EtcdClient(parse_store_url(args.store))
        except ValueError as e:
            controlplane_parser().error(f"--store: {e}")
    store = ConfigStore(args.config, data=data, replicated=client is not None)
    try:
        store.restore()
        store.load_directory()
    except (ConfigError, StoreError) as e:
        log.error("config_rejected", source="start", data_dir=str(args.data_dir), error=str(e))
        return 1
    log.info("state_restored", data_dir=str(args.data_dir), version=store.version, applied=len(store.applied),
             registered=len(store.workloads))
    security = None
    if args.insecure_plaintext:
        log.warning("plaintext_protocol", detail="--insecure-plaintext: no TLS and no authentication; anyone who "
                                                 "can reach the port reads and changes the config")
    else:
        from controlplane.ca import CaError
        from controlplane.security import Security
        from proxy.identity.spiffe import InvalidSpiffeId

        try:
            security = Security.open(_security_options(args))
        except (CaError, InvalidSpiffeId, OSError) as e:
            log.error("ca_rejected", ca_dir=str(args.ca_dir), error=str(e))
            return 1
        log.info("ca_loaded", ca_dir=str(args.ca_dir), created=security.ca.created,
                 trust_domain=security.trust_domain, roots=security.ca.root_fingerprints,
                 signer=security.ca.signing_certificate.subject.rfc4514_string(),
                 root_certificate=str(args.ca_dir / "root-cert.pem"))
        for warning in security.ca.warnings:
            log.warning("ca_warning", warning=warning)
    options = ServerOptions(
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=3 * args.heartbeat_interval,
        grace_period_s=args.grace_period,
        debounce_quiet_s=args.debounce,
        debounce_max_s=max(args.debounce, args.debounce_max),
        poll_interval_s=args.poll_interval,
        push_concurrency=max(1, args.push_concurrency),
        delta=not args.no_delta,
        settle_heap=True,
    )
    replication = None
    if client is not None:
        from controlplane.replicated import Replication

        # a dead replica's registrations last as long as a disconnected proxy's
        replication = Replication(client, store, log, lease_ttl_s=args.grace_period)
    plane = ControlPlane(store, options, log, security, replication)

    async def run() -> int:
        async with trio.open_nursery() as nursery:
            try:
                port = await nursery.start(plane.serve, args.listen[0], args.listen[1])
            except OSError as e:
                log.error("listen_failed", address=f"{args.listen[0]}:{args.listen[1]}", error=str(e))
                return 1
            if args.ui_address is not None:
                from controlplane.meshview import MeshView

                view = MeshView(plane.status, plane.server_id, log)
                try:
                    ui_port = await nursery.start(view.serve, args.ui_address[0], args.ui_address[1])
                except OSError as e:
                    log.error("listen_failed", address=f"{args.ui_address[0]}:{args.ui_address[1]}", error=str(e))
                    nursery.cancel_scope.cancel()  # the control plane's listener is already serving
                    return 1
                if args.ui_port_file is not None:
                    _write_port_file(args.ui_port_file, ui_port)
            if args.port_file is not None:
                _write_port_file(args.port_file, port)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("shutting_down", signal=signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        return 0

    return trio.run(run)


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# triomesh controlplane token / ca


def token_main(argv: Sequence[str]) -> int:
    from controlplane.tokens import TOKENS_FILE, TokenError, create_token
    from proxy.identity.spiffe import InvalidSpiffeId

    p = argparse.ArgumentParser(prog="triomesh controlplane token",
                                description="make a bootstrap token (a proxy proves with it that it may take an "
                                            "identity in a namespace) or an admin token (apply, delete, status); "
                                            "prints the token once, the file keeps only its hash")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ca-dir", type=Path, help=f"the control plane's CA directory (tokens in {TOKENS_FILE}; "
                                                   f"default ${CA_DIR_ENV} or {default_ca_dir()})")
    where.add_argument("--tokens-file", type=Path)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--namespace", help="the namespace whose identities the token grants")
    what.add_argument("--admin", action="store_true", help="an admin token for apply, delete and status")
    p.add_argument("--service-account", default="", help="only this service account of the namespace")
    args = p.parse_args(list(argv))
    if args.admin and args.service_account:
        p.error("--service-account goes with --namespace")
    path = args.tokens_file or (args.ca_dir or _ca_dir_default()) / TOKENS_FILE
    try:
        token = create_token(path, namespace=args.namespace or "", service_account=args.service_account,
                             admin=args.admin)
    except (TokenError, InvalidSpiffeId, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0


def ca_main(argv: Sequence[str]) -> int:
    from controlplane.ca import CaError, CertificateAuthority, certificate_fingerprint
    from controlplane.ca_rotation import add_new_root, drop_old_roots, switch_signer, waiting_root
    from proxy.identity.spiffe import DEFAULT_TRUST_DOMAIN

    p = argparse.ArgumentParser(prog="triomesh controlplane ca",
                                description="inspect the CA directory, or rotate its self-signed root in three steps")
    p.add_argument("action", choices=("show", "rotate", "switch-signer", "drop-old-roots"),
                   help="show: the signer and the trusted roots; rotate: make a new root and trust it next to the "
                        "old one, which keeps signing; switch-signer (once every proxy has the new root): sign "
                        "with it; drop-old-roots (once every proxy renewed): trust only the signer's root")
    p.add_argument("--ca-dir", type=Path, default=None, help=f"default ${CA_DIR_ENV} or {default_ca_dir()}")
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    args = p.parse_args(list(argv))
    args.ca_dir = args.ca_dir or _ca_dir_default()
    try:
        if args.action == "rotate":
            new = add_new_root(args.ca_dir, args.trust_domain)
            print(f"new root {certificate_fingerprint(new)} is trusted from now on; the current signer keeps "
                  f"signing. Once every proxy has the new root (hand the new root-cert.pem to proxies and CLIs), "
                  f"run `triomesh controlplane ca switch-signer`")
        elif args.action == "switch-signer":
            new = switch_signer(args.ca_dir, args.trust_domain)
            print(f"root {certificate_fingerprint(new)} signs from now on; a running control plane picks it up. "
                  f"Once every proxy renewed, run `triomesh controlplane ca drop-old-roots`")
        elif args.action == "drop-old-roots":
            dropped = drop_old_roots(args.ca_dir, args.trust_domain)
            for root in dropped:
                print(f"dropped root {certificate_fingerprint(root)} {root.subject.rfc4514_string()}")
            if not dropped:
                print("no root to drop: the signer's root is the only one trusted")
        ca = CertificateAuthority.load(args.ca_dir, args.trust_domain)
    except (CaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"signer {ca.signing_certificate.subject.rfc4514_string()} "
          f"(until {ca.signing_certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    waiting = waiting_root(args.ca_dir, ca)
    for root in ca.roots:
        note = " (waits to sign: `ca switch-signer`)" if root == waiting else ""
        print(f"trusted root {certificate_fingerprint(root)} {root.subject.rfc4514_string()}{note}")
    return 0


CONTROLPLANE_SUBCOMMANDS = {"token": token_main, "ca": ca_main}


# --------------------------------------------------------------------------------------------------
# CLI requests: apply, delete, proxy-status


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlplane", type=_host_port, default=None,
                   help=f"HOST:PORT of the control plane (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    p.add_argument("--controlplane-ca", type=Path, default=None, metavar="FILE",
                   help=f"the root certificate(s) of a control plane that serves TLS (default ${CONTROLPLANE_CA_ENV}; "
                        "without it: plaintext)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help=f"a file holding an admin token (default ${TOKEN_FILE_ENV})")


def _address(args: argparse.Namespace) -> tuple[str, int]:
    if args.controlplane is not None:
        return args.controlplane
    return _host_port(os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS))


class ClientCredentials:
    """What a CLI shows a control plane: the roots that verify its TLS certificate, and a token."""

    def __init__(self, roots_pem: bytes | None = None, token: str = "") -> None:
        self.roots_pem = roots_pem
        self.token = token

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientCredentials":
        """Raises OSError naming the file that cannot be read."""
        ca_path = args.controlplane_ca or (Path(os.environ[CONTROLPLANE_CA_ENV]) if os.environ.get(CONTROLPLANE_CA_ENV) else None)
        token_path = args.token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
        return cls(ca_path.read_bytes() if ca_path is not None else None,
                   token_path.read_text().strip() if token_path is not None else "")


def request(address: tuple[str, int], message, *, timeout_s: float = REQUEST_TIMEOUT_S,
            credentials: ClientCredentials | None = None):
    """Send one request message on a new stream and return the reply (a blocking helper for CLIs)."""
    import trio

    from controlplane.framed import connect

    import msgspec

    credentials = credentials or ClientCredentials()
    if credentials.token and credentials.roots_pem is not None:  # a token never travels in plaintext
        message = msgspec.structs.replace(message, token=credentials.token)

    async def run():
        context = None
        if credentials.roots_pem is not None:
            from controlplane.tls import client_context

            context = client_context(credentials.roots_pem)
        with trio.fail_after(timeout_s):
            framed = await connect(*address, tls=context)
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
        credentials = ClientCredentials.from_args(args)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    message = ApplyRequest(sources=sources) if op == "apply" else DeleteRequest(sources=sources)
    try:
        reply = request(address, message, credentials=credentials)
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

    from controlplane.wire import Error, StatusReply, StatusRequest

    p = argparse.ArgumentParser(prog="triomesh proxy-status",
                                description="every proxy the control plane knows, with the config version it has ACKed")
    _address_arg(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = p.parse_args(list(argv))
    address = _address(args)
    try:
        reply = request(address, StatusRequest(), credentials=ClientCredentials.from_args(args))
    except Exception as e:  # noqa: BLE001
        print(f"error: control plane at {address[0]}:{address[1]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if isinstance(reply, Error):
        print(f"error: {reply.code}: {reply.message}", file=sys.stderr)
        return 1
    if not isinstance(reply, StatusReply):
        print(f"error: unexpected reply {type(reply).__name__}", file=sys.stderr)
        return 1
    if args.output == "json":
        sys.stdout.write(msgspec.json.encode(reply).decode() + "\n")
        return 0
    with_identity = any(s.identity for s in reply.proxies)  # a control plane that is a CA
    rows = [("NAME", "NAMESPACE", "ADDRESS", "STATUS", "ACKED", "SENT", *(("IDENTITY", "CERT EXPIRES") if with_identity else ()),
             "LAST NACK")]
    for s in reply.proxies:
        if not s.connected:
            status = "DISCONNECTED"
        elif s.sent_version and s.sent_version == s.acked_version:
            status = "SYNCED"
        elif s.last_nack_version and s.last_nack_version == s.sent_version:
            status = "NACKED"
        else:
            status = "STALE"
        identity = (s.identity or "-", s.certificate_not_after or "-") if with_identity else ()
        rows.append((s.node_id, s.namespace, s.address, status, s.acked_version or "-", s.sent_version or "-",
                     *identity, (s.last_nack[:80] if s.last_nack else "-")))
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
    from controlplane.wire import Error, StatusReply, StatusRequest

    address = _address(args)
    try:
        reply = request(address, StatusRequest(), credentials=ClientCredentials.from_args(args))
    except Exception as e:  # noqa: BLE001
        return f"control plane at {address[0]}:{address[1]}: {type(e).__name__}: {e}"
    if isinstance(reply, Error):
        return f"{reply.code}: {reply.message}"
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
