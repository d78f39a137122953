"""Supervisor side of the workers: spawn each worker process, talk to it, restart it when it dies.

Each slot runs a loop: make a socketpair, start `python -m proxy.runner.worker` with one end, send it
the current config, then read its messages until the channel closes; wait for the process, back off
if it died young, start again. Stats requests and config pushes go through the slot's channel.

Why a fresh interpreter per worker (subprocess + an inherited socketpair fd) rather than fork or
multiprocessing: a fork of the running supervisor would copy its Trio loop, signal wakeup fd and
admin socket into the child; multiprocessing adds pickling and its own helper processes. A fresh
`python -m` costs ~0.2 s once per start or restart and nothing per request.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import trio

import proxy
from proxy.runner import control
from proxy.stats import Stats, cumulative_rows

RESTART_BACKOFF_MIN_S = 0.2
RESTART_BACKOFF_MAX_S = 5.0
HEALTHY_UPTIME_S = 5.0  # a worker that lived this long resets the backoff
STOP_GRACE_S = 5.0


def _worker_env() -> dict[str, str]:
    """Workers import the same `proxy` package as the supervisor, wherever it was started from."""
    env = dict(os.environ)
    root = str(Path(proxy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


class WorkerSlot:
    """One of the N worker positions. `version` is what its current process serves ("" when none)."""

    def __init__(self, index: int, *, worker_args: list[str], current_config: Callable[[], control.LoadConfig | None],
                 stats: Stats, log: Any,
                 current_identity: Callable[[], control.LoadIdentity | None] = lambda: None) -> None:
        self.index = index
        self._worker_args = worker_args
        self._current_config = current_config
        self._current_identity = current_identity
        self.identity_serial = ""  # the workload certificate its current process serves with
        self._log = log.bind(worker=index)
        self.process: trio.Process | None = None
        self.channel: control.ControlChannel | None = None
        self.version = ""
        self.listeners: list[str] = []
        self.listener_errors: list[str] = []
        self.last_error = ""
        self.last_error_reason = ""
        self.failed_version = ""  # the last version this worker could not compile (or prepare)
        self.prepared_version = ""  # the last version this worker prepared (bound its listeners)
        self.restarts = 0
        self._config_news = trio.Event()  # set (and replaced) when the worker reports on a config or exits
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list]] = {}
        # listening sockets a hot restart handed to this slot, passed to the worker it starts until
        # the supervisor releases them (once the first workers serve)
        self.inherited: list[tuple[control.ListenerSocket, socket.socket]] = []
        self._restarts = stats.counter("triomesh_worker_restarts_total")
        self._drain_reset = stats.counter("triomesh_drain_cx_reset_total")
        self._stopping = False
        self._stopped = trio.Event()  # wakes a restart backoff early
        # counters of processes that died, so summed counters do not go backwards on a restart
        self.retired_rows: list[control.StatsRow] = []
        self._last_rows: list[control.StatsRow] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(self) -> None:
        backoff = RESTART_BACKOFF_MIN_S
        while not self._stopping:
            started = time.monotonic()
            await self._run_once()
            if self._stopping:
                return
            lived = time.monotonic() - started
            backoff = RESTART_BACKOFF_MIN_S if lived >= HEALTHY_UPTIME_S else min(backoff * 2, RESTART_BACKOFF_MAX_S)
            self.restarts += 1
            self._restarts.value += 1
            self._log.warning("worker_restarting", after_s=round(backoff, 2), lived_s=round(lived, 2))
            with trio.move_on_after(backoff):
                await self._stopped.wait()

    async def _run_once(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cmd = [sys.executable, "-m", "proxy.runner.worker", "--control-fd", str(child.fileno()),
                   "--index", str(self.index), *self._worker_args]
            inherited = [(s.fileno(), info.address, info.port) for info, s in self.inherited]
            if inherited:
                cmd += ["--inherited-sockets", json.dumps(inherited)]
            process = await trio.lowlevel.open_process(
                cmd, pass_fds=(child.fileno(), *(fd for fd, _, _ in inherited)), env=_worker_env())
        except OSError as e:  # EMFILE, EAGAIN (process limit), ...: try again after the backoff
            parent.close()
            self._log.error("worker_spawn_failed", error=str(e))
            return
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.process = process
        channel = control.ControlChannel(trio.socket.from_stdlib_socket(parent))
        self.channel = channel
        self._log.info("worker_started", pid=process.pid)
        try:
            identity = self._current_identity()
            if identity is not None:  # before the config: a listener must not serve without it
                await self._send(identity)
            config = self._current_config()
            if config is not None:
                await self._send(config)
            while True:
                try:
                    msg = await channel.receive()
                except control.FrameError as e:  # a worker we cannot understand is replaced
                    self._log.error("worker_protocol_error", pid=process.pid, error=str(e))
                    process.kill()
                    break
                if msg is None:
                    break
                if isinstance(msg, control.ListenerSockets):
                    self._exported(msg, channel.take_fds(len(msg.sockets)))
                    continue
                self._handle(msg)
        finally:
            self.channel = None
            self.version = ""
            self.identity_serial = ""
            self._notify_config()
            self._fail_pending()
            self._retire_counters()
            with trio.CancelScope(shield=True):
                await channel.aclose()
                code = await self._reap(process)
            if not self._stopping:
                self._log.error("worker_exited", pid=process.pid, returncode=code, signal=_signal_name(code))
            self.process = None

    async def _reap(self, process: trio.Process) -> int | None:
        """Wait for the process to exit; it should follow its channel. Kill it if it does not."""
        with trio.move_on_after(STOP_GRACE_S):
            return await process.wait()
        process.kill()
        return await process.wait()

    def _handle(self, msg: control.Message) -> None:
        if isinstance(msg, control.ConfigApplied):
            self.version = msg.version
            self.listeners = list(msg.listeners)
            self.listener_errors = list(msg.errors)
            self.last_error = ""
            for err in msg.errors:
                self._log.error("worker_listener_error", version=msg.version, error=err)
            self._notify_config()
        elif isinstance(msg, control.ConfigPrepared):
            self.prepared_version = msg.version
            self._notify_config()
        elif isinstance(msg, control.ConfigFailed):
            self.last_error = msg.error
            self.last_error_reason = msg.reason
            self.failed_version = msg.version
            self._notify_config()
            self._log.error("worker_config_failed", version=msg.version, error=msg.error)
        elif isinstance(msg, control.IdentityLoaded):
            self.identity_serial = msg.serial
        elif isinstance(msg, control.Drained):
            self._drain_reset.value += msg.active_at_deadline
            self._log.info("worker_drained", pid=self.pid, reset_connections=msg.active_at_deadline)
        elif isinstance(msg, control.StatsReply):
            self._last_rows = msg.rows
            waiter = self._pending.pop(msg.request_id, None)
            if waiter is not None:
                waiter[1].append(msg.rows)
                waiter[0].set()
        else:
            self._log.warning("supervisor_unexpected_message", message=type(msg).__name__)

    async def _send(self, msg: control.Message) -> bool:
        channel = self.channel
        if channel is None:
            return False
        try:
            await channel.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # the worker is gone (EBADF: its channel was closed while this send waited); run()
            # notices and restarts it
            return False
        return True

    async def push_config(self, config: control.LoadConfig) -> None:
        await self._send(config)

    async def push_identity(self, message: control.LoadIdentity) -> None:
        await self._send(message)

    async def prepare_config(self, message: control.PrepareConfig) -> str | None:
        """Ask the worker to prepare `message`; its error text, or None once prepared (or when no
        worker runs: one that starts later is sent the current config first)."""
        # a rejected attempt's version is tried again by the next update: forget its answer
        self.prepared_version = self.failed_version = ""
        if not await self._send(message):
            return None
        while self.channel is not None and message.version not in (self.prepared_version, self.failed_version):
            await self._config_news.wait()
        if self.channel is not None and self.failed_version == message.version:
            return self.last_error
        return None

    async def commit_config(self, version: str) -> None:
        await self._send(control.CommitConfig(version))

    async def abort_config(self, version: str) -> None:
        await self._send(control.AbortConfig(version))

    def _notify_config(self) -> None:
        self._config_news.set()
        self._config_news = trio.Event()

    async def wait_config(self, version: str) -> None:
        """Until the worker serves `version` or reports it cannot; at once when no worker runs (a
        worker that starts later is sent the current config first)."""
        while self.channel is not None and version not in (self.version, self.failed_version):
            await self._config_news.wait()

    async def fetch_stats(self, timeout_s: float) -> list[control.StatsRow] | None:
        """The worker's counters and histograms now; None when it is not running (its last counts are
        in retired_rows then). A running worker too busy to answer in time gives the rows of its last
        answer: a scrape must never see a counter go backwards (Prometheus would take it for a restart)."""
        request_id = next(self._ids)
        event, box = trio.Event(), []
        self._pending[request_id] = (event, box)
        try:
            if not await self._send(control.GetStats(request_id)):
                return None
            with trio.move_on_after(timeout_s):
                await event.wait()
            if box:
                return box[0]
            self._log.warning("worker_stats_late", pid=self.pid, timeout_s=timeout_s, stale=bool(self._last_rows))
            return self._last_rows or None
        finally:
            self._pending.pop(request_id, None)

    def _exported(self, msg: control.ListenerSockets, fds: list[int]) -> None:
        sockets = [(info, socket.socket(fileno=fd)) for info, fd in zip(msg.sockets, fds)]
        waiter = self._pending.pop(msg.request_id, None)
        if waiter is None or len(fds) != len(msg.sockets):
            for _, sock in sockets:
                sock.close()
            if waiter is not None:
                waiter[0].set()  # an incomplete set is no set: nothing handed over from this worker
                self._log.error("worker_export_incomplete", sockets=len(msg.sockets), fds=len(fds))
            return
        waiter[1].append(sockets)
        waiter[0].set()

    async def export_listeners(self, timeout_s: float) -> list[tuple[control.ListenerSocket, socket.socket]] | None:
        """Duplicates of the worker's listening sockets with what each is for; None when the worker
        is not running or did not answer in time."""
        request_id = next(self._ids)
        event, box = trio.Event(), []
        self._pending[request_id] = (event, box)
        try:
            if not await self._send(control.ExportListeners(request_id)):
                return None
            with trio.move_on_after(timeout_s):
                await event.wait()
            return box[0] if box else None
        finally:
            self._pending.pop(request_id, None)

    def release_inherited(self) -> None:
        """Close this process's copies of the handed-over sockets: the worker holds its own, and
        a worker started later binds afresh."""
        for _, sock in self.inherited:
            sock.close()
        self.inherited = []

    def _fail_pending(self) -> None:
        for event, _ in self._pending.values():
            event.set()
        self._pending.clear()

    def _retire_counters(self) -> None:
        if not self._last_rows:
            return
        self.retired_rows = cumulative_rows([self.retired_rows, self._last_rows])
        self._last_rows = []

    async def drain(self, duration_s: float, idle_close_after_s: float = 0.0) -> None:
        """Ask the worker to drain (it exits when done); run() then returns instead of restarting it."""
        self._stopping = True
        self._stopped.set()
        if not await self._send(control.Drain(duration_s, idle_close_after_s)):
            process = self.process
            if process is not None and process.returncode is None:
                process.kill()  # no channel to drain over: it would serve on unsupervised

    async def stop(self) -> None:
        """Ask the worker to exit; run() then returns instead of restarting it."""
        self._stopping = True
        self._stopped.set()
        if not await self._send(control.Shutdown()):
            process = self.process
            if process is not None and process.returncode is None:
                process.kill()  # workers ignore SIGTERM (it is the supervisor's to handle)
