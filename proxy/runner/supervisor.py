"""The supervisor process: owns the config (load, validate, version, reload), the worker slots and
the admin listener.

Theory of operation: the supervisor reads the config files' bytes, compiles them once itself (to
validate and to have the Snapshot for /config_dump), and only then sends the same bytes with the
new version to every worker, which compiles them into its own Snapshot and swaps it in. An invalid
config never leaves the supervisor: the error is logged with file/document/field path, counted, and
the old version keeps serving. Reloads come from SIGHUP or from polling the files' (mtime, size)
about once a second; they run one at a time in one task, and triggers arriving meanwhile coalesce.

With a control plane (`--controlplane`), the config comes from its stream instead of files (a
`--config` file is then only a bootstrap served until the first push): the xDS client hands each
pushed resource set to `apply_pushed`, which compiles it with this proxy's labels, sends it to every
worker as sources (the same LoadConfig as a file reload) and returns once the workers serve it, so
the ACK means "served"; a refusal raises, and the client NACKs with the error text. Files are then
not watched and SIGHUP only re-sends the current config to workers that are behind.

A drain (SIGTERM/SIGINT, POST /quitquitquit or /drain_listeners) sends every worker Drain: it stops
accepting, lets its connections finish for up to the drain duration, resets the rest and exits (see
proxy/runner/worker.py). From its first moment /ready answers 503, configs are no longer applied and
dead workers are not restarted; the supervisor exits once every worker did, unless asked to stay
(`skip_exit`). A second signal stops the workers at once.
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
from proxy.runner import admin, control
from proxy.runner.config_source import Sources, build_snapshot, content_digest, fingerprint, read_sources
from proxy.runner.workers import WorkerSlot
from proxy.stats import Stats, merge, render_prometheus

CONFIG_POLL_INTERVAL_S = 1.0
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
    controlplane: tuple[str, int] | None = None
    node_id: str | None = None  # None: HOSTNAME.ADMIN_PORT
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    register: str | None = None  # the workload address to register as a WorkloadEntry
    drain_duration_s: float = DEFAULT_DRAIN_DURATION_S  # how long connections in flight get once a drain starts
    max_downstream_connections: int | None = None  # per worker (proxy/overload.py)
    max_worker_rss_bytes: int | None = None  # per worker (proxy/overload.py)


@dataclass(frozen=True)
class ActiveConfig:
    version: str
    sources: Sources
    digest: str
    snapshot: Snapshot
    loaded_at: float  # time.time()


class ConfigRejected(Exception):
    pass


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
        self._last_fingerprint = fingerprint(options.config_path) if options.config_path is not None else ()
        # the workload labels Gateway selectors, Sidecar workloadSelectors and sourceLabels match, the
        # same from files as from a control plane; a file-config proxy given no --label is a standalone
        # edge that applies every Gateway (None)
        self.proxy_labels: dict[str, str] | None = (
            dict(options.labels) if options.controlplane is not None or options.labels else None)
        # and its namespace, which picks the DestinationRules and same-named short hosts that apply
        self.proxy_namespace: str | None = options.namespace if self.proxy_labels is not None else None
        self.xds = None  # proxy.xds.client.ClientState once the control-plane client runs
        self._nursery: trio.Nursery | None = None
        self.node = None  # proxy.xds.client.NodeInfo
        self._reload_send, self._reload_receive = trio.open_memory_channel[str](1)
        self.draining = False  # from the first moment of a drain: /ready 503, no reloads, no restarts
        self._draining_gauge = self.stats.gauge("triomesh_draining")
        self._exit = trio.Event()  # set by SIGTERM/SIGINT or /quitquitquit: exit once drained
        worker_args = ["--access-log", options.access_log, "--log-level", options.log_level,
                       "--log-format", options.log_format]
        if options.max_downstream_connections is not None:
            worker_args += ["--max-downstream-connections", str(options.max_downstream_connections)]
        if options.max_worker_rss_bytes is not None:
            worker_args += ["--max-worker-rss-bytes", str(options.max_worker_rss_bytes)]
        self.slots = [WorkerSlot(i, worker_args=worker_args, current_config=self._load_message,
                                 stats=self.stats, log=log) for i in range(options.concurrency)]

    # ---- config

    def _load_message(self) -> control.LoadConfig | None:
        a = self.active
        if a is None:
            return None
        return control.LoadConfig(a.version, a.sources, self.options.bind_address, self.proxy_labels,
                                  self.proxy_namespace)

    def _compile(self, reason: str) -> ActiveConfig | None:
        """Read and compile the config. None when unchanged. Raises ConfigRejected (already logged
        and counted) when it does not load or compile."""
        self._last_fingerprint = fingerprint(self.options.config_path)  # before reading: later writes show
        try:
            sources = read_sources(self.options.config_path)
            digest = content_digest(sources)
            if self.active is not None and digest == self.active.digest:
                return None
            version = str(self._versions + 1)
            snapshot = build_snapshot(sources, version=version, bind_address=self.options.bind_address,
                                      proxy_labels=self.proxy_labels, proxy_namespace=self.proxy_namespace)
        except Exception as e:  # noqa: BLE001 - any failure to load refuses the config, never the proxy
            if self.active is not None:
                self._rejected.value += 1
            from proxy.config.errors import ConfigError

            # a ConfigError says precisely what is wrong; anything else is our bug: keep its traceback
            self.log.error("config_rejected", reason=reason, path=str(self.options.config_path),
                           keeping_version=self.active.version if self.active else None,
                           exc_info=not isinstance(e, ConfigError), **config_error_fields(e))
            raise ConfigRejected(str(e)) from e
        self._versions += 1
        return ActiveConfig(version, sources, digest, snapshot, time.time())

    def load_initial(self) -> None:
        """Load the --config files. Without them (a control plane's proxy) there is nothing to serve
        until the first push, and /ready answers 503 until then."""
        if self.options.config_path is None:
            return
        active = self._compile("startup")
        assert active is not None
        self.active = active
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
            new = self._compile(reason)
        except ConfigRejected:
            return
        if new is None:
            self.log.info("config_unchanged", reason=reason, version=self.active.version)
        else:
            old = self.active
            self.active = new
            self._applied.value += 1
            self.log.info("config_reloaded", reason=reason, version=new.version, previous_version=old.version,
                          listeners=[l.name for l in new.snapshot.listeners])
        await self._push_to_workers(self._load_message())

    async def _push_to_workers(self, message: control.LoadConfig | None) -> None:
        if message is None or self.draining:
            return
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
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
        from proxy.xds.sources import to_sources

        try:
            # compiled from the resources themselves: errors name the file/document they came from
            snapshot = compile_resources(resources, version=version, bind_address=self.options.bind_address,
                                         proxy_labels=self.proxy_labels, proxy_namespace=self.proxy_namespace)
            sources = to_sources(resources, version)
        except Exception as e:
            self._rejected.value += 1
            from proxy.config.errors import ConfigError

            self.log.error("config_rejected", reason="controlplane_push", version=version,
                           keeping_version=self.active.version if self.active else None,
                           exc_info=not isinstance(e, ConfigError), **config_error_fields(e))
            raise
        old = self.active
        self.active = ActiveConfig(version, sources, content_digest(sources), snapshot, time.time())
        self._applied.value += 1
        self.log.info("config_pushed", version=version, previous_version=old.version if old else None,
                      resources=len(resources), listeners=[l.name for l in snapshot.listeners])
        message = self._load_message()
        await self._push_to_workers(message)
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
            address=o.register or "",
            register=o.register is not None,
            admin_address=f"{o.admin_host}:{admin_port}",
        )

    async def _run_xds(self, admin_port: int) -> None:
        from proxy.xds.client import run_client

        self.node = self.node_info(admin_port)
        assert self.options.controlplane is not None
        self.log.info("controlplane_client_starting", address="%s:%d" % self.options.controlplane,
                      node_id=self.node.node_id, namespace=self.node.namespace, labels=self.node.labels)
        self.xds = await self._nursery.start(
            partial(run_client, self.options.controlplane, self.node, self.apply_pushed, log=self.log))

    def request_reload(self, reason: str) -> None:
        try:
            self._reload_send.send_nowait(reason)
        except trio.WouldBlock:
            pass  # one is already queued; it will read the files as they are then

    async def _reload_loop(self) -> None:
        async for reason in self._reload_receive:
            await self.reload(reason)

    async def _watch_files(self) -> None:
        while True:
            await trio.sleep(CONFIG_POLL_INTERVAL_S)
            if fingerprint(self.options.config_path) != self._last_fingerprint:
                self.request_reload("file_changed")

    # ---- admin state

    def is_ready(self) -> bool:
        a = self.active
        return not self.draining and a is not None and all(slot.version == a.version and not slot.listener_errors for slot in self.slots)

    async def stats_prometheus(self) -> str:
        exports: list[list] = [self.stats.export()]

        async def fetch(slot: WorkerSlot) -> None:
            rows = await slot.fetch_stats(STATS_TIMEOUT_S)
            if rows is not None:
                exports.append(rows)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                exports.append(slot.retired_rows)
                nursery.start_soon(fetch, slot)
        return render_prometheus(merge(exports))

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
        if self.options.controlplane is not None:
            x, n = self.xds, self.node
            out["controlplane"] = {
                "address": "%s:%d" % self.options.controlplane,
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
            }
        return out

    # ---- lifecycle

    def start_drain(self, reason: str, *, exit_after: bool = True) -> None:
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
            self._nursery.start_soon(slot.drain, duration_s)

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

    async def run(self, admin_sock: trio.socket.SocketType) -> None:
        admin_port = admin_sock.getsockname()[1]  # the bound one (the option may say 0)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._signals)
            await nursery.start(admin.serve_admin, admin_sock, self, self.log)
            self.log.info("admin_listening", address=f"{self.options.admin_host}:{admin_port}")
            nursery.start_soon(self._reload_loop)
            if self.options.controlplane is not None:
                await self._run_xds(admin_port)
            else:
                nursery.start_soon(self._watch_files)
            async with trio.open_nursery() as slots:
                for slot in self.slots:
                    slots.start_soon(slot.run)
            # every slot returned: they only do once drained or stopped; /drain_listeners stays up
            await self._exit.wait()
            nursery.cancel_scope.cancel()
        self.log.info("stopped")


async def serve(options: ProxyOptions, log: Any) -> int:
    supervisor = Supervisor(options, log)
    try:
        supervisor.load_initial()
    except ConfigRejected:
        return 1
    try:
        admin_sock = await admin.open_admin_socket(options.admin_host, options.admin_port)
    except OSError as e:
        log.error("admin_bind_failed", address=f"{options.admin_host}:{options.admin_port}", error=str(e))
        return 1
    await supervisor.run(admin_sock)
    return 0


