"""The supervisor process: owns the config (load, validate, version, reload), the worker slots and
the admin listener.

Theory of operation: the supervisor reads the config files' bytes and compiles them once itself (to
validate, and for /config_dump), then sends the compiled Snapshot, encoded by
proxy/config/snapshot_transfer.py, with the new version to every worker, which loads it (a small
fraction of a compile: see bench/config_push.py) and swaps it in. An invalid
config never leaves the supervisor: the error is logged with file/document/field path, counted, and
the old version keeps serving. Reloads come from SIGHUP, from an inotify watch of the config
directory, or from polling the files' (inode, mtime, size) about once a second; they run one at a
time in one task, and triggers arriving meanwhile coalesce.

Files are read only when complete (see proxy/runner/config_watch.py): never while a writer has a
config file open, and only when two reads SETTLE_S apart give the same bytes, so a directory written
file by file or a `..data` symlink swap is applied as one snapshot. An update applies whole or not
at all: every worker first loads it and binds its new listeners (PrepareConfig); only when all
did is it committed, else aborted and rejected, and the old listeners never stop serving. An update
that removes every listener, or every route of a listener, is read once more after
CONFIRM_REMOVAL_S and applied only if the files still say so, with a warning. Each rejection is
counted by reason and the last one is shown in /config_dump and /config_status.

With a control plane (`--controlplane`), the config comes from its stream instead of files (a
`--config` file is then only a bootstrap served until the first push): the xDS client hands each
pushed resource set to `apply_pushed`, which compiles it with this proxy's labels, sends the result to
every worker (the same LoadConfig as a file reload) and returns once the workers serve it, so
the ACK means "served"; a refusal raises, and the client NACKs with the error text. Files are then
not watched and SIGHUP only re-sends the current config to workers that are behind.

With a TLS control plane (`--controlplane-ca`), the proxy proves its identity (a bootstrap token, then
its own certificate) and the client keeps a workload certificate fresh (proxy/identity/manager.py).
Each new identity goes to every worker (LoadIdentity over its control socketpair, before any config
when a worker starts); the key stays in this process and its workers' memory.

A drain (SIGTERM/SIGINT, POST /quitquitquit or /drain_listeners) sends every worker Drain: it stops
accepting, lets its connections finish for up to the drain duration, resets the rest and exits (see
proxy/runner/worker.py). From its first moment /ready answers 503, configs are no longer applied and
dead workers are not restarted; the supervisor exits once every worker did, unless asked to stay
(`skip_exit`). A second signal stops the workers at once.

Hot restart (proxy/runner/hot_restart.py): with `--hot-restart-socket`, a serving supervisor listens
on that path; a new proxy that connects gets every worker's listening sockets (ExportListeners) and
the admin socket, and once its own workers serve tells this one to drain (reason "hot_restart"): the
admin listener stops accepting at once (the new proxy answers on the same socket) and the workers
drain as on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from proxy.config.snapshot import Snapshot
from proxy.runner import admin, control, hot_restart
from proxy.config.snapshot_transfer import encode_snapshot
from proxy.runner.config_source import Sources, build_snapshot, content_digest, fingerprint, read_sources
from proxy.runner.config_watch import (READ_ATTEMPTS, SETTLE_S, ConfigWatch, Deferred, files_being_written,
                                        read_complete, reopen_if_replaced, wait_file_events)
from proxy.runner.workers import WorkerSlot
from proxy.stats import Stats, cumulative_rows, merge, render_prometheus
from proxy.telemetry.metrics_overrides import apply_overrides
from proxy.telemetry.peer import identity_from_labels
from proxy.xds.failover import ControlPlaneAddress
from proxy.xds.hold import ReconnectHold

CONFIG_POLL_INTERVAL_S = 1.0
CONFIRM_REMOVAL_S = 1.0  # an update removing every listener or route is read again after this long
STATS_TIMEOUT_S = 2.0
WORKER_APPLY_TIMEOUT_S = 10.0  # a pushed config's ACK waits this long at most for the workers
DEFAULT_DRAIN_DURATION_S = 5.0  # Istio's terminationDrainDuration default


@dataclass(frozen=True)
class ProxyOptions:
    config_path: Path | None  # with a control plane: an optional bootstrap, served until the first push
    concurrency: int
    bind_address: str
    admin_host: str
    admin_port: int
    access_log: str
    log_level: str
    log_format: str
    controlplane: tuple[ControlPlaneAddress, ...] | None = None  # one or more replicas
    node_id: str | None = None  # None: HOSTNAME.ADMIN_PORT
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    workload_name: str | None = None  # Istio's metrics' workload name (None: from the labels)
    cluster_id: str = "Kubernetes"  # Istio's metrics' cluster name
    register: str | None = None  # the workload address to register as a WorkloadEntry
    drain_duration_s: float = DEFAULT_DRAIN_DURATION_S  # how long connections in flight get once a drain starts
    max_downstream_connections: int | None = None  # per worker (proxy/overload.py)
    request_headers_timeout_s: float = 10.0  # a started request head must be complete within this (408)
    zipkin_address: tuple[str, int] | None = None  # the Zipkin collector spans go to; None: no tracing
    trace_sampling_percent: float = 1.0  # Istio's meshConfig.defaultConfig.tracing.sampling
    credentials_dir: str | None = None  # where Gateway credentialNames resolve (proxy/tls/certificates.py)
    max_worker_rss_bytes: int | None = None  # per worker (proxy/overload.py)
    hot_restart_socket: str | None = None  # Unix socket path of hot restart (proxy/runner/hot_restart.py)
    service_account: str = ""  # the workload's service account ("": Kubernetes' "default")
    controlplane_ca: Path | None = None  # root(s) that verify a TLS control plane; None: plaintext
    controlplane_token_file: Path | None = None  # the bootstrap token proving the workload's identity


@dataclass(frozen=True)
class ActiveConfig:
    version: str
    sources: Sources
    digest: str
    snapshot: Snapshot
    loaded_at: float  # time.time()
    encoded: bytes = b""  # `snapshot` encoded for the workers (proxy/config/snapshot_transfer.py)


class ConfigRejected(Exception):
    pass


@dataclass(frozen=True)
class RejectedUpdate:
    """The last update the proxy refused, as /config_dump and /config_status show it."""

    version: str  # the version it would have had
    digest: str  # sha256 of its sources ("" when they could not be read)
    reason: str  # invalid, unreadable, listener_bind, worker_failed, internal
    file: str
    error: str
    rejected_at: float  # time.time()

    def dump(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "reason": self.reason, "file": self.file,
                "error": self.error, "time": _utc(self.rejected_at)}


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _bound_listeners(snapshot: Snapshot) -> list:
    return [l for l in snapshot.listeners if l.bind_to_port]


def _has_routes(listener) -> bool:
    table = listener.route_table
    return bool(table.exact or table.suffixes or table.catch_all is not None or listener.tcp_route is not None)


def config_error_fields(error: BaseException) -> dict[str, Any]:
    """Log fields of a failed load/compile: the ConfigError's location parts when it has them."""
    out: dict[str, Any] = {"error": str(error)}
    for attr in ("file", "document", "kind", "name", "field_path", "message"):
        value = getattr(error, attr, None)
        if value is not None:
            out[attr] = value
    if "file" not in out:
        out["error_type"] = type(error).__name__
    return out


class Supervisor:
    def __init__(self, options: ProxyOptions, log: Any) -> None:
        self.options = options
        self.log = log
        self.stats = Stats()
        self._applied = self.stats.counter("triomesh_config_reloads_total", result="applied")
        self._rejected = self.stats.counter("triomesh_config_reloads_total", result="rejected")
        self._versions = 0
        self.active: ActiveConfig | None = None
        self.last_rejected: RejectedUpdate | None = None
        self._rejections: dict[str, Any] = {}  # reason -> counter
        # None: unknown, the next poll reads the files (set when a read found them incomplete)
        self._last_fingerprint = fingerprint(options.config_path) if options.config_path is not None else ()
        self.watch: ConfigWatch | None = None  # opened by run() for file configs
        # the workload labels Gateway selectors, Sidecar workloadSelectors and sourceLabels match, the
        # same from files as from a control plane; a file-config proxy given no --label is a standalone
        # edge that applies every Gateway (None)
        self.proxy_labels: dict[str, str] | None = (
            dict(options.labels) if options.controlplane is not None or options.labels else None)
        # and its namespace, which picks the DestinationRules and same-named short hosts that apply
        self.proxy_namespace: str | None = options.namespace if self.proxy_labels is not None else None
        self.xds = None  # proxy.xds.client.ClientState once the control-plane client runs
        # held while a hot restart hands this proxy over: the new process takes the control-plane stream
        self.controlplane_hold = ReconnectHold()
        self._nursery: trio.Nursery | None = None
        self.node = None  # proxy.xds.client.NodeInfo
        self._reload_send, self._reload_receive = trio.open_memory_channel[str](1)
        self.draining = False  # from the first moment of a drain: /ready 503, no reloads, no restarts
        self._draining_gauge = self.stats.gauge("triomesh_draining")
        self._exit = trio.Event()  # set by SIGTERM/SIGINT or /quitquitquit: exit once drained
        self._admin_scope = trio.CancelScope()  # the admin listener: a hot restart hands it over
        self._admin_sock: trio.socket.SocketType | None = None  # set by run()
        self.hot_restart: hot_restart.HotRestartListener | None = None
        # counters and histograms of the proxies this one replaced by hot restarts, added to /stats:
        # those that exited, and the latest of those still draining (by their pid)
        self.carried_rows: list[control.StatsRow] = []
        self._parent_rows: dict[int, list[control.StatsRow]] = {}
        # the proxy that took over from this one: it gets the final counters when this one exits
        self._successor: control.FrameChannel | None = None
        worker_args = ["--access-log", options.access_log, "--log-level", options.log_level,
                       "--log-format", options.log_format]
        worker_args += ["--workload", identity_from_labels(
            options.namespace, options.labels, options.workload_name, options.cluster_id).header_value().decode()]
        worker_args += ["--request-headers-timeout-s", repr(options.request_headers_timeout_s),
                        "--workers", str(options.concurrency)]
        if options.max_downstream_connections is not None:
            worker_args += ["--max-downstream-connections", str(options.max_downstream_connections)]
        if options.zipkin_address is not None:
            worker_args += ["--zipkin-address", "[%s]:%d" % options.zipkin_address,
                            "--trace-sampling", repr(options.trace_sampling_percent),
                            "--node-id", options.node_id or f"{socket.gethostname()}.{options.admin_port}"]
        if options.max_worker_rss_bytes is not None:
            worker_args += ["--max-worker-rss-bytes", str(options.max_worker_rss_bytes)]
        if options.hot_restart_socket is not None:  # a worker whose supervisor dies waits there for the next
            worker_args += ["--hot-restart-socket", options.hot_restart_socket,
                            "--drain-duration-s", str(options.drain_duration_s)]
        from proxy.identity.manager import IdentityManager

        self.identity = IdentityManager(self._identity_changed, log=log)
        self.slots = [WorkerSlot(i, worker_args=worker_args, current_config=self._load_message,
                                 stats=self.stats, log=log, current_identity=self._identity_message)
                      for i in range(options.concurrency)]

    # ---- config

    def _load_message(self) -> control.LoadConfig | None:
        a = self.active
        if a is None:
            return None
        return control.LoadConfig(a.version, a.encoded)

    def _identity_message(self) -> control.LoadIdentity | None:
        identity = self.identity.current
        return control.LoadIdentity(identity) if identity is not None else None

    async def _identity_changed(self, identity) -> None:
        message = control.LoadIdentity(identity)
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(slot.push_identity, message)

    def _reject(self, reason: str, error: BaseException | str, *, trigger: str, version: str, digest: str = "",
                file: str | None = None) -> ConfigRejected:
        """Count, log and remember a refused update; returns the exception to raise."""
        from proxy.config.errors import ConfigError

        fields = config_error_fields(error) if isinstance(error, BaseException) else {"error": error}
        if trigger != "startup":  # a startup failure is the exit status
            self._rejected.value += 1
            counter = self._rejections.get(reason)
            if counter is None:
                counter = self._rejections[reason] = self.stats.counter("triomesh_config_rejections_total",
                                                                       reason=reason)
            counter.value += 1
        self.last_rejected = RejectedUpdate(version, digest, reason,
                                            fields.get("file") or file or self._config_origin(),
                                            fields["error"], time.time())
        # a ConfigError says precisely what is wrong; anything else is our bug: keep its traceback
        self.log.error("config_rejected", reason=trigger, rejection=reason, path=str(self.options.config_path),
                       keeping_version=self.active.version if self.active else None,
                       exc_info=isinstance(error, BaseException) and not isinstance(error, ConfigError), **fields)
        return ConfigRejected(fields["error"])

    def _config_origin(self) -> str:
        if self.options.controlplane is not None:
            return "controlplane " + ",".join(map(str, self.options.controlplane))
        return str(self.options.config_path)

    def _compile(self, sources: Sources, reason: str) -> ActiveConfig | None:
        """Compile the sources read. None when unchanged. Raises ConfigRejected (already logged
        and counted) when they do not load or compile."""
        from proxy.config.errors import ConfigError

        digest = content_digest(sources)
        if self.active is not None and digest == self.active.digest:
            return None
        version = str(self._versions + 1)
        try:
            snapshot = build_snapshot(sources, version=version, bind_address=self.options.bind_address,
                                      proxy_labels=self.proxy_labels, proxy_namespace=self.proxy_namespace,
                                      credentials_dir=self.options.credentials_dir)
            encoded = encode_snapshot(snapshot)
        except Exception as e:  # noqa: BLE001 - any failure to load refuses the config, never the proxy
            raise self._reject("invalid" if isinstance(e, ConfigError) else "internal", e, trigger=reason,
                               version=version, digest=digest) from e
        return ActiveConfig(version, sources, digest, snapshot, time.time(), encoded)

    def _read_now(self, reason: str) -> Sources:
        from proxy.config.errors import ConfigError

        try:
            return read_sources(self.options.config_path)
        except ConfigError as e:  # missing path, unreadable file
            raise self._reject("unreadable", e, trigger=reason, version=str(self._versions + 1)) from e

    async def _read_complete(self, reason: str) -> Sources | None:
        """The config files as their writers left them (proxy/runner/config_watch.py), or None while
        one is still being written or they keep changing (the writer's close, or the next poll, reads
        them again). Raises ConfigRejected when they cannot be read."""
        read = await read_complete(self.options.config_path, self.watch, lambda: self._read_now(reason))
        if isinstance(read, Deferred):
            self.log.info("config_deferred", reason=reason, detail=read.detail, **({"files": read.files} if read.files else {}))
            self._last_fingerprint = None
            return None
        self._last_fingerprint = read.fingerprint
        return read.sources

    async def _confirm_removals(self, new: ActiveConfig, reason: str) -> bool:
        """An update that takes away every listener, or every route of a listener, is what a cut or
        emptied file looks like: applied only if the files still say so CONFIRM_REMOVAL_S later, and
        then loudly. True: go ahead."""
        old = self.active
        if old is None:
            return True
        old_listeners = {l.name: l for l in _bound_listeners(old.snapshot)}
        new_listeners = _bound_listeners(new.snapshot)
        routeless = sorted(l.name for l in new_listeners
                           if not _has_routes(l) and l.name in old_listeners and _has_routes(old_listeners[l.name]))
        all_removed = bool(old_listeners) and not new_listeners
        if not all_removed and not routeless:
            return True
        await trio.sleep(CONFIRM_REMOVAL_S)
        again = await self._read_complete(reason)
        if again is None or content_digest(again) != new.digest:
            self.log.info("config_removal_unconfirmed", reason=reason, version=new.version,
                          detail="the files changed again; reading them anew")
            self._last_fingerprint = None
            return False
        self.log.warning("config_removes_all_listeners" if all_removed else "config_removes_all_routes",
                         reason=reason, version=new.version, previous_version=old.version,
                         listeners_before=len(old_listeners), listeners_after=len(new_listeners),
                         routeless_listeners=routeless, files={name: len(data) for name, data in new.sources})
        return True

    async def _swap(self, new: ActiveConfig, reason: str) -> None:
        """Serve `new` on every worker or on none: each running worker compiles it and binds its new
        listeners first; if one cannot, every worker drops what it prepared and ConfigRejected is
        raised (logged, counted, shown), the old config serving on. Otherwise `new` becomes active
        and every worker swaps to it."""
        if self.draining:  # the workers drain and serve nothing new; what /config_dump shows
            self.active = new
            return
        message = control.PrepareConfig(new.version, new.encoded)
        errors: dict[int, tuple[str, str]] = {}
        running = [slot for slot in self.slots if slot.channel is not None]
        pids = {slot.index: slot.pid for slot in running}

        async def prepare(slot: WorkerSlot) -> None:
            with trio.move_on_after(WORKER_APPLY_TIMEOUT_S) as scope:
                error = await slot.prepare_config(message)
                if error is not None:
                    errors[slot.index] = (slot.last_error_reason, error)
            if scope.cancelled_caught:
                errors[slot.index] = ("worker_failed", f"no answer in {WORKER_APPLY_TIMEOUT_S}s")

        async with trio.open_nursery() as nursery:
            for slot in running:
                nursery.start_soon(prepare, slot)
        if errors:
            for slot in running:
                await slot.abort_config(new.version)
            kind = "listener_bind" if any(r == "listener_bind" for r, _ in errors.values()) else "worker_failed"
            # workers share the listeners, so their errors are mostly the same: say each one once
            text = "; ".join(sorted({e for _, e in errors.values()}))
            raise self._reject(kind, text, trigger=reason, version=new.version, digest=new.digest)
        old = self.active
        self.active = new
        if new.version == str(self._versions + 1):  # a file config's (a control plane names its own)
            self._versions += 1
        self._applied.value += 1
        for slot in running:
            await slot.commit_config(new.version)
        self.log.info("config_reloaded", reason=reason, version=new.version,
                      previous_version=old.version if old else None,
                      listeners=[l.name for l in new.snapshot.listeners])
        # a worker that (re)started meanwhile may have got the old config: it gets the new one as a
        # plain load; those that prepared it and still run have it committed
        committed = [slot for slot in running if slot.pid == pids[slot.index]]
        await self._push_to_workers(self._load_message(), skip=committed)

    def load_initial(self) -> None:
        """Load the --config files. Without them (a control plane's proxy) there is nothing to serve
        until the first push, and /ready answers 503 until then."""
        if self.options.config_path is None:
            return
        # no watch yet to tell a writer's close: the two-reads rule alone (a file still changing
        # after every attempt is served as last read, and the watch picks up the rest)
        sources = self._read_now("startup")
        for _ in range(READ_ATTEMPTS):
            time.sleep(SETTLE_S)
            again = self._read_now("startup")
            if content_digest(again) == content_digest(sources):
                break
            sources = again
        active = self._compile(sources, "startup")
        assert active is not None
        self.active = active
        self._versions = 1
        self.log.info("config_loaded", version=active.version, path=str(self.options.config_path),
                      files=[name for name, _ in active.sources], listeners=[l.name for l in active.snapshot.listeners])

    async def reload(self, reason: str) -> None:
        if self.draining:
            self.log.info("config_reload_ignored", reason=reason, detail="draining")
            return
        if self.options.controlplane is not None:
            # the control plane is the source; a bootstrap file must not replace what it pushed
            if self.active is not None:
                self.log.info("config_reload_ignored", reason=reason, version=self.active.version,
                              detail="config comes from the control plane; re-sending it to workers behind")
                await self._push_to_workers(self._load_message())
            return
        try:
            sources = await self._read_complete(reason)
            if sources is None:
                return
            new = self._compile(sources, reason)
            if new is None:
                self.log.info("config_unchanged", reason=reason, version=self.active.version)
            elif await self._confirm_removals(new, reason):
                await self._swap(new, reason)
                return
        except ConfigRejected:
            return
        await self._push_to_workers(self._load_message())

    async def _push_to_workers(self, message: control.LoadConfig | None, *, skip: list[WorkerSlot] = ()) -> None:
        if message is None or self.draining:
            return
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                if slot in skip:
                    continue
                # a worker behind, or one that could not open a listener (it retries the bind)
                if slot.version != message.version or slot.listener_errors:
                    nursery.start_soon(slot.push_config, message)

    # ---- config from a control plane

    async def apply_pushed(self, resources: list, version: str) -> None:
        """Serve a resource set the control plane pushed. Returns once every running worker serves
        it (or after WORKER_APPLY_TIMEOUT_S: a worker that is restarting gets it when it starts).
        Raises ConfigError (or any error) when it does not compile: the client NACKs with its text
        and the previous config keeps serving."""
        from proxy.config.compile import compile_resources
        from proxy.config.errors import ConfigError
        from proxy.xds.sources import to_sources

        try:
            # compiled from the resources themselves: errors name the file/document they came from
            snapshot = compile_resources(resources, version=version, bind_address=self.options.bind_address,
                                         proxy_labels=self.proxy_labels, proxy_namespace=self.proxy_namespace,
                                         credentials_dir=self.options.credentials_dir)
            sources = to_sources(resources, version)
            encoded = encode_snapshot(snapshot)
        except Exception as e:
            self._reject("invalid" if isinstance(e, ConfigError) else "internal", e, trigger="controlplane_push",
                         version=version)
            raise
        new = ActiveConfig(version, sources, content_digest(sources), snapshot, time.time(), encoded)
        self.log.info("config_pushed", version=version, resources=len(resources),
                      listeners=[l.name for l in snapshot.listeners])
        # raises ConfigRejected (a listener cannot bind): the client NACKs with its text
        await self._swap(new, "controlplane_push")
        if self.draining:
            return  # the workers drain and will not serve it; nothing to wait for
        with trio.move_on_after(WORKER_APPLY_TIMEOUT_S) as scope:
            for slot in self.slots:
                await slot.wait_config(version)
        if scope.cancelled_caught:
            self.log.warning("workers_behind", version=version,
                             workers={s.index: s.version for s in self.slots if s.version != version})
        failed = [s for s in self.slots if s.failed_version == version and s.version != version]
        if failed:
            # the supervisor compiled it, so this is a bug; NACK so proxy-status shows it
            raise RuntimeError("; ".join(f"worker {s.index} could not apply {version}: {s.last_error}" for s in failed))

    def node_info(self, admin_port: int):
        from proxy.xds.client import NodeInfo

        o = self.options
        return NodeInfo(
            node_id=o.node_id or f"{socket.gethostname()}.{admin_port}",
            namespace=o.namespace,
            labels=dict(o.labels),
            service_account=o.service_account,
            address=o.register or "",
            register=o.register is not None,
            admin_address=f"{o.admin_host}:{admin_port}",
        )

    def credentials(self):
        """The control-plane root and bootstrap token from their files. Raises OSError naming a file."""
        from proxy.xds.client import Credentials

        o = self.options
        roots = o.controlplane_ca.read_bytes() if o.controlplane_ca is not None else None
        token = o.controlplane_token_file.read_text().strip() if o.controlplane_token_file is not None else ""
        return Credentials(roots, token)

    async def _run_xds(self, admin_port: int, credentials) -> None:
        from proxy.xds.client import run_client

        self.node = self.node_info(admin_port)
        assert self.options.controlplane is not None
        self.log.info("controlplane_client_starting", address=",".join(map(str, self.options.controlplane)),
                      node_id=self.node.node_id, namespace=self.node.namespace, labels=self.node.labels,
                      tls=credentials.controlplane_roots_pem is not None)
        self.xds = await self._nursery.start(
            partial(run_client, self.options.controlplane, self.node, self.apply_pushed, log=self.log,
                    credentials=credentials, identity=self.identity, hold=self.controlplane_hold))

    def request_reload(self, reason: str) -> None:
        try:
            self._reload_send.send_nowait(reason)
        except trio.WouldBlock:
            pass  # one is already queued; it will read the files as they are then

    async def _reload_loop(self) -> None:
        async for reason in self._reload_receive:
            await self.reload(reason)

    async def _watch_files(self) -> None:
        """Wake on file events (at once) or every CONFIG_POLL_INTERVAL_S (a missed event, no
        inotify); ask for a reload when the files changed and no config file is being written."""
        while True:
            await wait_file_events(self.watch, CONFIG_POLL_INTERVAL_S)
            self.watch, reopened = reopen_if_replaced(self.watch, self.options.config_path)
            if reopened:
                self.log.info("config_watching", path=str(self.options.config_path), inotify=self.watch is not None,
                              detail="directory replaced")
            if files_being_written(self.watch):
                continue  # its writer's IN_CLOSE_WRITE wakes this loop again
            if self._last_fingerprint is None or fingerprint(self.options.config_path) != self._last_fingerprint:
                self.request_reload("file_changed")

    # ---- admin state

    def is_ready(self) -> bool:
        a = self.active
        return not self.draining and a is not None and all(slot.version == a.version and not slot.listener_errors for slot in self.slots)

    async def stats_prometheus(self) -> str:
        # Telemetry `metrics` overrides reshape Istio's series here, once per scrape, never per request
        active = self.active
        return render_prometheus(apply_overrides(merge(await self._exports()),
                                                 active.snapshot.metrics if active is not None else None))

    async def cumulative_rows(self) -> list[control.StatsRow]:
        """Counters and histograms of everything this proxy counted, and of those it replaced: what a
        hot restart hands on (final once the workers have exited: their last counts are retired)."""
        return cumulative_rows(await self._exports())

    async def _exports(self) -> list[list[control.StatsRow]]:
        exports: list[list] = [self.stats.export(), self.carried_rows, *self._parent_rows.values()]

        async def fetch(slot: WorkerSlot) -> None:
            rows = await slot.fetch_stats(STATS_TIMEOUT_S)
            if rows is not None:
                exports.append(rows)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                exports.append(slot.retired_rows)
                nursery.start_soon(fetch, slot)
        return exports

    def config_dump(self) -> dict[str, Any]:
        a = self.active
        out: dict[str, Any] = {"version": ""} if a is None else {
            "version": a.version,
            "last_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.loaded_at)),
            "files": [name for name, _ in a.sources],
            "workers": [{"index": s.index, "pid": s.pid, "version": s.version, "listeners": s.listeners,
                         "listener_errors": s.listener_errors, "restarts": s.restarts} for s in self.slots],
            "config": a.snapshot.dump,
        }
        out["last_rejected"] = self.last_rejected.dump() if self.last_rejected else None
        if self.options.controlplane is not None:
            x, n = self.xds, self.node
            out["controlplane"] = {
                "address": ",".join(map(str, self.options.controlplane)),
                "connected_to": x.address if x else "",
                "node_id": n.node_id if n else "",
                "namespace": self.options.namespace,
                "labels": dict(self.options.labels),
                "connected": bool(x and x.connected),
                "server_id": x.server_id if x else "",
                "acked_version": x.version if x else "",
                "connects": x.connects if x else 0,
                "acks": x.acks if x else 0,
                "nacks": x.nacks if x else 0,
                "last_nack": x.last_error if x else "",
                "last_disconnect": x.last_disconnect if x else "",
                "tls": bool(x and x.tls),
            }
            identity = self.identity.dump()
            identity["workers"] = [{"index": s.index, "serial": s.identity_serial} for s in self.slots]
            out["workload_identity"] = identity
        return out

    def certs(self) -> dict[str, Any]:
        """/certs: the terminating Gateway servers' certificates, as their files hold them now."""
        from proxy.tls.certificates import certificates_report

        return certificates_report(self.active.snapshot.listeners if self.active is not None else ())

    def server_info(self) -> dict[str, Any]:
        """/server_info (Envoy's name): the state, and the TLS library every worker's data path uses
        (loaded here on the first ask, never at start: a proxy without TLS does not load it)."""
        from proxy.tls.openssl import describe

        state = "DRAINING" if self.draining else ("LIVE" if self.is_ready() else "PRE_INITIALIZING")
        return {"state": state, "workers": len(self.slots), "tls": describe()}

    def config_status(self) -> dict[str, Any]:
        """What `proxy-status` shows for a proxy: the version served (by the supervisor and each
        worker, SYNCED when they agree) beside the last update refused and the refusals by reason."""
        a = self.active
        return {
            "version": a.version if a else "",
            "last_updated": _utc(a.loaded_at) if a else "",
            "files": [name for name, _ in a.sources] if a else [],
            "status": "SYNCED" if self.is_ready() else ("DRAINING" if self.draining else "STALE"),
            "workers": [{"index": s.index, "version": s.version, "listener_errors": s.listener_errors}
                        for s in self.slots],
            "last_rejected": self.last_rejected.dump() if self.last_rejected else None,
            "rejections": {reason: c.value for reason, c in sorted(self._rejections.items())},
        }

    # ---- lifecycle

    def start_drain(self, reason: str, *, exit_after: bool = True, idle_close_after_s: float = 0.0) -> None:
        """Begin draining (once; a later call may only add the exit): /ready answers 503 at once,
        every worker stops accepting, closes idle connections, asks busy ones to close after their
        response (HTTP/2: GOAWAY), gives them the drain duration, resets what is left and exits.
        `exit_after`: the process exits once every worker did; otherwise it stays, not ready, for
        its admin (/drain_listeners?graceful&skip_exit)."""
        if exit_after:
            self._exit.set()
        if self.draining:
            return
        self.draining = True
        self._draining_gauge.value = 1
        duration_s = self.options.drain_duration_s
        self.log.info("draining", reason=reason, duration_s=duration_s, exit=exit_after)
        for slot in self.slots:
            self._nursery.start_soon(slot.drain, duration_s, idle_close_after_s)

    # ---- hot restart

    def inherit(self, handover: hot_restart.Handover) -> None:
        """Give each worker slot its share of the listening sockets a hot restart handed over."""
        for slot, share in zip(self.slots, hot_restart.assign_to_workers(handover.listeners, len(self.slots))):
            slot.inherited = share
        self.log.info("hot_restart_inherited", parent_pids=handover.parent_pids, sockets=len(handover.listeners),
                      admin=handover.admin is not None,
                      listeners=sorted({f"{i.name} {i.address}:{i.port}" for i, _ in handover.listeners}))

    async def _finish_takeover(self, handover: hot_restart.Handover) -> None:
        """Once every worker serves: release the handed-over sockets' copies here, tell the old
        proxy to drain, listen on the hot restart path. If the workers do not serve in time the
        old proxy is left serving and this one drains away."""
        with trio.move_on_after(hot_restart.HANDOVER_TIMEOUT_S) as scope:
            while not self.is_ready():
                await trio.sleep(0.05)
        for slot in self.slots:
            slot.release_inherited()
        if scope.cancelled_caught:
            await handover.close()
            self.log.error("hot_restart_failed", parent_pids=handover.parent_pids,
                           error=f"workers did not serve within {hot_restart.HANDOVER_TIMEOUT_S}s; "
                                 "the running proxy keeps serving")
            self.start_drain("hot_restart_failed")
            return
        await handover.drain_parent()
        self.log.info("hot_restart_complete", parent_pids=handover.parent_pids)
        await self._listen_hot_restart()

    def follow_parents(self, handover: hot_restart.Handover) -> None:
        """From the takeover on, the old processes' counters count in this one's /stats."""
        for channel, pid, answers in zip(handover.channels, handover.parent_pids, handover.answers_counters):
            if answers:
                self._nursery.start_soon(hot_restart.follow_counters, channel, self._parent_reporter(pid), self.log)

    def _parent_reporter(self, pid: int):
        def report(rows: list[control.StatsRow] | None, final: bool) -> None:
            if rows is not None:
                self._parent_rows[pid] = rows  # the latest replaces the previous: never added twice
            if final:
                carried = self._parent_rows.pop(pid, [])
                self.carried_rows = cumulative_rows([self.carried_rows, carried])
                self.log.info("hot_restart_counters_carried", parent_pid=pid, rows=len(carried),
                              final=rows is not None)
        return report

    async def _hand_on_counters(self) -> None:
        """The old side, at its exit: the final counters to the proxy that took over."""
        # the task answering its polls goes on: sends are whole frames under the channel's lock, and a
        # poll answered after the final counters is ignored (cancelling it could cut a frame in two)
        channel, self._successor = self._successor, None
        with trio.move_on_after(hot_restart.CONNECT_TIMEOUT_S):
            try:
                await channel.send(hot_restart.Counters(await self.cumulative_rows(), final=True))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self.log.warning("hot_restart_counters_lost", error=f"{type(e).__name__}: {e}")
        await channel.aclose()

    async def _listen_hot_restart(self) -> None:
        path = self.options.hot_restart_socket
        listener = hot_restart.HotRestartListener(path)
        try:
            await listener.open()
        except OSError as e:
            self.log.error("hot_restart_listen_failed", path=path, error=str(e))
            return
        self.hot_restart = listener
        self.log.info("hot_restart_listening", path=path)
        self._nursery.start_soon(self._serve_hot_restart, listener)

    async def _serve_hot_restart(self, listener: hot_restart.HotRestartListener) -> None:
        try:
            while not self.draining:
                channel = await listener.accept()
                handed_over = False
                try:
                    handed_over = await self._hand_over(channel)
                except hot_restart.HAND_OVER_ERRORS as e:
                    # a client that broke off or spoke garbage: nothing was handed over, serve on
                    self.log.warning("hot_restart_abandoned", error=f"{type(e).__name__}: {e}")
                finally:
                    if handed_over:  # kept for its counter polls and, at the exit, the final counters
                        self._successor = channel
                        self._nursery.start_soon(hot_restart.serve_counters, channel, self.cumulative_rows)
                    else:
                        await channel.aclose()
        finally:
            listener.close()

    async def _hand_over(self, channel) -> bool:
        """The old side of one hot restart: every worker's listening sockets and the admin socket.
        True when the new proxy took over (this one drains)."""
        exported: list[list] = []

        async def collect() -> list[hot_restart.Batch]:
            # the new process is the same node: when the control plane replaces our stream with its
            # one, ours is not made again (the two would take the node id from each other in turn)
            self.controlplane_hold.hold()
            for slot in self.slots:
                sockets = await slot.export_listeners(hot_restart.EXPORT_TIMEOUT_S)
                if sockets is None:
                    # a worker restarting now: its sockets are gone anyway (the new proxy binds)
                    self.log.warning("hot_restart_worker_skipped", worker=slot.index)
                    continue
                exported.append(sockets)
            host, port = self._admin_sock.getsockname()[:2]
            return [hot_restart.Batch("listener", [info for info, _ in sockets], [s.fileno() for _, s in sockets])
                    for sockets in exported] + [
                hot_restart.Batch("admin", [control.ListenerSocket("admin", "HTTP", host, port)],
                                  [self._admin_sock.fileno()])]

        drain = False
        try:
            drain = await hot_restart.hand_over(channel, draining=self.draining, collect=collect,
                                                counters=self.cumulative_rows, log=self.log)
        finally:
            if not drain:  # the new process did not take over: this one serves on, stream and all
                self.controlplane_hold.release()
            for sockets in exported:  # our copies; the workers and the new proxy hold theirs
                for _, sock in sockets:
                    sock.close()
        if drain:
            self._admin_scope.cancel()  # the new proxy answers on the same admin socket
            # the listening sockets live on in the new proxy: a keep-alive client is told to
            # reconnect on its next response rather than have its idle connection closed under a request
            self.start_drain("hot_restart",
                             idle_close_after_s=self.options.drain_duration_s * hot_restart.IDLE_CLOSE_SHARE)
        return drain

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self.request_reload("SIGHUP")
                elif not self._exit.is_set():
                    self.start_drain(name)
                else:  # a second one: what is still in flight is cut now
                    self.log.info("shutting_down", signal=name, detail="signalled again while draining")
                    for slot in self.slots:
                        await slot.stop()

    async def _serve_admin(self, admin_sock, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._admin_scope:
            await admin.serve_admin(admin_sock, self, self.log, task_status=task_status)

    async def run(self, admin_sock: trio.socket.SocketType, handover: hot_restart.Handover | None = None,
                  credentials=None) -> None:
        admin_port = admin_sock.getsockname()[1]  # the bound one (the option may say 0)
        self._admin_sock = admin_sock
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._signals)
            await nursery.start(self._serve_admin, admin_sock)
            self.log.info("admin_listening", address=f"{self.options.admin_host}:{admin_port}")
            if handover is not None:
                self.follow_parents(handover)
                nursery.start_soon(self._finish_takeover, handover)
            elif self.options.hot_restart_socket is not None:
                await self._listen_hot_restart()
            nursery.start_soon(self._reload_loop)
            if self.options.controlplane is not None:
                await self._run_xds(admin_port, credentials)
            else:
                self.watch = ConfigWatch.open(self.options.config_path)
                self.log.info("config_watching", path=str(self.options.config_path),
                              inotify=self.watch is not None)
                nursery.start_soon(self._watch_files)
            async with trio.open_nursery() as slots:
                for slot in self.slots:
                    slots.start_soon(slot.run)
            # every slot returned: they only do once drained or stopped; /drain_listeners stays up
            await self._exit.wait()
            if self._successor is not None:
                await self._hand_on_counters()
            nursery.cancel_scope.cancel()
        if self.hot_restart is not None:
            self.hot_restart.close()
        self.log.info("stopped")


async def serve(options: ProxyOptions, log: Any) -> int:
    supervisor = Supervisor(options, log)
    try:
        supervisor.load_initial()
    except ConfigRejected:
        return 1
    credentials = None
    if options.controlplane is not None:
        try:
            credentials = supervisor.credentials()
        except OSError as e:
            log.error("controlplane_credentials_unreadable", error=str(e))
            return 1
    handover = None
    if options.hot_restart_socket is not None:
        try:
            handover = await hot_restart.take_over(options.hot_restart_socket, log)
        except hot_restart.HotRestartError as e:
            log.error("hot_restart_refused", path=options.hot_restart_socket, error=str(e))
            return 1
    admin_sock = None
    if handover is not None:
        supervisor.inherit(handover)
        if handover.admin is not None and handover.admin.getsockname()[:2] == (options.admin_host, options.admin_port):
            admin_sock = trio.socket.from_stdlib_socket(handover.admin)
            handover.admin = None
        handover.close_unused()  # another admin address: the old proxy's admin closes with it
    if admin_sock is None:
        try:
            admin_sock = await admin.open_admin_socket(options.admin_host, options.admin_port)
        except OSError as e:
            log.error("admin_bind_failed", address=f"{options.admin_host}:{options.admin_port}", error=str(e))
            if handover is not None:
                for slot in supervisor.slots:
                    slot.release_inherited()
                await handover.close()  # the old proxy serves on
            return 1
    await supervisor.run(admin_sock, handover, credentials)
    return 0


