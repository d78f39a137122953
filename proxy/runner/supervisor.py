"""The supervisor process: owns the config (load, validate, version, reload), the worker slots and
the admin listener.

Theory of operation: the supervisor reads the config files' bytes, compiles them once itself (to
validate and to have the Snapshot for /config_dump), and only then sends the same bytes with the
new version to every worker, which compiles them into its own Snapshot and swaps it in. An invalid
config never leaves the supervisor: the error is logged with file/document/field path, counted, and
the old version keeps serving. Reloads come from SIGHUP or from polling the files' (mtime, size)
about once a second; they run one at a time in one task, and triggers arriving meanwhile coalesce.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
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
        self._last_fingerprint = fingerprint(options.config_path)
        self._reload_send, self._reload_receive = trio.open_memory_channel[str](1)
        worker_args = ["--access-log", options.access_log, "--log-level", options.log_level,
                       "--log-format", options.log_format]
        self.slots = [WorkerSlot(i, worker_args=worker_args, current_config=self._load_message,
                                 stats=self.stats, log=log) for i in range(options.concurrency)]

    # ---- config

    def _load_message(self) -> control.LoadConfig | None:
        a = self.active
        if a is None:
            return None
        return control.LoadConfig(a.version, a.sources, self.options.bind_address)

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
            snapshot = build_snapshot(sources, version=version, bind_address=self.options.bind_address)
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
        active = self._compile("startup")
        assert active is not None
        self.active = active
        self.log.info("config_loaded", version=active.version, path=str(self.options.config_path),
                      files=[name for name, _ in active.sources], listeners=[l.name for l in active.snapshot.listeners])

    async def reload(self, reason: str) -> None:
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
        message = self._load_message()
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                # a worker behind, or one that could not open a listener (it retries the bind)
                if slot.version != message.version or slot.listener_errors:
                    nursery.start_soon(slot.push_config, message)

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
        return a is not None and all(slot.version == a.version and not slot.listener_errors for slot in self.slots)

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
        if a is None:
            return {"version": ""}
        return {
            "version": a.version,
            "last_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.loaded_at)),
            "files": [name for name, _ in a.sources],
            "workers": [{"index": s.index, "pid": s.pid, "version": s.version, "listeners": s.listeners,
                         "listener_errors": s.listener_errors, "restarts": s.restarts} for s in self.slots],
            "config": a.snapshot.dump,
        }

    # ---- lifecycle

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.request_reload("SIGHUP")
                else:
                    self.log.info("shutting_down", signal=signal.Signals(signum).name)
                    for slot in self.slots:
                        await slot.stop()

    async def run(self, admin_sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            await nursery.start(admin.serve_admin, admin_sock, self, self.log)
            self.log.info("admin_listening", address=f"{self.options.admin_host}:{self.options.admin_port}")
            nursery.start_soon(self._reload_loop)
            nursery.start_soon(self._watch_files)
            async with trio.open_nursery() as slots:
                for slot in self.slots:
                    slots.start_soon(slot.run)
            # every slot returned: they only do after stop()
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


