"""Worker process entry: one Trio loop, one DataPlane, the listeners, driven over the control channel.

Started by the supervisor as `python -m proxy.runner.worker --control-fd N ...` (a fresh interpreter,
not a fork of the supervisor: no inherited Trio state, threads or sockets besides the control fd).
The worker exits when the supervisor says Shutdown, the control channel closes (supervisor gone), or
a Drain it was sent has ended. With a hot restart path, a worker whose supervisor died is orphaned
instead: it serves on and offers its listening sockets to the next proxy (proxy/runner/hot_restart.py),
then drains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
from typing import Sequence

import trio

from proxy import logging as tm_logging
from proxy.l7.access_log import FORMATS as ACCESS_LOG_FORMATS
from proxy.l7.access_log import AccessLog
from proxy.overload import MemoryWatermark, OverloadLimits, watch_memory
from proxy.runner import control, hot_restart
from proxy.runner.garbage_collection import freeze_startup_objects, pace_collector
from proxy.config.snapshot_transfer import decode_snapshot
from proxy.runner.listeners import ORIGINAL_DST, ListenerManager
from proxy.identity.holder import IdentityHolder
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats, cumulative_rows
from proxy.telemetry.istio_metrics import IstioMetrics
from proxy.telemetry.peer import UNKNOWN_WORKLOAD, parse_peer_header
from proxy.l7.stages.tracing import Tracing
from proxy.tracing.exporter import export_spans
from proxy.tracing.spans import DEFAULT_SAMPLING_PERCENT, TracingSettings

ACCESS_LOG_FLUSH_INTERVAL_S = 1.0
DRAIN_POLL_INTERVAL_S = 0.05  # how soon after its last connection ends a draining worker reports


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxy.runner.worker")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)  # how many the proxy runs, this one included
    p.add_argument("--access-log", choices=ACCESS_LOG_FORMATS, default="json")
    p.add_argument("--log-level", choices=tuple(tm_logging.LEVELS), default="info")
    p.add_argument("--log-format", choices=tm_logging.FORMATS, default="json")
    p.add_argument("--max-downstream-connections", type=int, default=None)
    p.add_argument("--request-headers-timeout-s", type=float, default=10.0)
    # this proxy's workload in Istio's metrics, in the peer metadata header's own form
    p.add_argument("--workload", default="")
    p.add_argument("--max-worker-rss-bytes", type=int, default=None)
    # a hot restart's listening sockets, inherited as open fds: JSON [[fd, address, port], ...]
    p.add_argument("--inherited-sockets", default="[]")
    # where an orphaned worker (its supervisor died) offers its sockets to the next proxy
    p.add_argument("--hot-restart-socket", default=None)
    p.add_argument("--drain-duration-s", type=float, default=5.0)
    # tracing: spans to this Zipkin collector (HOST:PORT; none: no tracing), the sampling percentage
    # and the node id the spans carry
    p.add_argument("--zipkin-address", default=None)
    p.add_argument("--trace-sampling", type=float, default=DEFAULT_SAMPLING_PERCENT)
    p.add_argument("--node-id", default="")
    return p


def inherited_sockets(spec: str) -> dict[tuple[str, int], list[trio.socket.SocketType]]:
    """The listening sockets named by --inherited-sockets, by (address, port)."""
    out: dict[tuple[str, int], list[trio.socket.SocketType]] = {}
    for fd, address, port in json.loads(spec):
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        out.setdefault((address, port), []).append(sock)
    return out


async def _flush_access_log(access_log: AccessLog) -> None:
    while True:
        await trio.sleep(ACCESS_LOG_FLUSH_INTERVAL_S)
        access_log.flush()


def _active_connections(stats: Stats) -> int:
    """Downstream connections open now: HTTP (L7) and TCP-proxied (L4, every cluster)."""
    return sum(value for kind, name, _, value in stats.export()
               if kind == "gauge" and name in ("triomesh_downstream_cx_active", "triomesh_tcp_downstream_cx_active"))


async def _drain(duration_s: float, plane, listeners: ListenerManager, stats: Stats,
                 channel: control.ControlChannel, log, idle_close_after_s: float = 0.0) -> None:
    """Stop accepting, let what is open finish for up to `duration_s`, reset the HTTP connections
    still open, report; the worker then exits (the caller cancels it), closing what remains.
    `idle_close_after_s` > 0 (a hot restart, the listening sockets live on in the next proxy): an
    idle keep-alive connection is not closed at once, which would race a request its client is
    sending, but answered `connection: close` when it sends one; those still idle then are closed."""
    await listeners.close_all()  # new connections are refused (or, handed over, go to the next proxy)
    plane.start_drain(close_idle=idle_close_after_s <= 0)
    log.info("worker_draining", duration_s=duration_s, active=_active_connections(stats),
             idle_close_after_s=idle_close_after_s)
    idle_close_at = trio.current_time() + idle_close_after_s if idle_close_after_s > 0 else None
    with trio.move_on_after(duration_s):
        while _active_connections(stats):
            await trio.sleep(DRAIN_POLL_INTERVAL_S)
            if idle_close_at is not None and trio.current_time() >= idle_close_at:
                idle_close_at = None
                plane.close_idle_downstream()
    active = _active_connections(stats)
    if active:
        plane.reset_downstream()
        log.warning("worker_drain_deadline", duration_s=duration_s, reset_connections=active)
    else:
        log.info("worker_drained")
    try:
        await channel.send(control.Drained(active))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the supervisor is gone; the worker exits all the same


async def _orphaned(path: str, index: int, listeners: ListenerManager, stats: Stats, log) -> bool:
    """The supervisor died: serve on, and offer this worker's listening sockets at a path of its
    own beside the hot restart path for up to ORPHAN_WAIT_S. True once a new proxy took them and
    asked for the drain; False when none came (the caller drains all the same)."""
    listener = hot_restart.HotRestartListener(f"{path}{hot_restart.ORPHAN_SUFFIX}{index}-{os.getpid()}")
    try:
        await listener.open()
    except OSError as e:
        log.error("worker_orphaned", detail="cannot offer the sockets; draining", path=listener.path, error=str(e))
        return False
    log.warning("worker_orphaned", detail="supervisor gone; serving on until the next proxy takes over",
                path=listener.path, wait_s=hot_restart.ORPHAN_WAIT_S)

    async def collect() -> list[hot_restart.Batch]:
        exported = listeners.export()
        return [hot_restart.Batch("listener", [control.ListenerSocket(e.name, e.protocol, e.address, e.port)
                                               for e in exported], [e.fileno for e in exported])]

    async def counters() -> list[control.StatsRow]:  # this worker's own: its supervisor took the rest along
        return cumulative_rows([stats.export()])

    try:
        with trio.move_on_after(hot_restart.ORPHAN_WAIT_S):
            while True:
                channel = await listener.accept()
                try:
                    if await hot_restart.hand_over(channel, draining=False, collect=collect, counters=counters,
                                                   log=log):
                        return True
                except hot_restart.HAND_OVER_ERRORS as e:
                    log.warning("hot_restart_abandoned", error=f"{type(e).__name__}: {e}")
                finally:
                    await channel.aclose()
        log.warning("worker_orphan_timeout", wait_s=hot_restart.ORPHAN_WAIT_S, detail="no proxy took over; draining")
        return False
    finally:
        listener.close()


async def run(channel: control.ControlChannel, *, access_log: AccessLog, log,
              limits: OverloadLimits = OverloadLimits(),
              inherited: dict[tuple[str, int], list] | None = None,
              hot_restart_socket: str | None = None, index: int = 0, drain_duration_s: float = 5.0,
              workload: str = "", tracing: TracingSettings | None = None,
              request_headers_timeout_s: float = 10.0, workers: int = 1) -> None:
    from proxy.l4.gateway_tcp import GatewayTcpServer
    from proxy.l4.transparent import CaptureServer
    from proxy.l7.dataplane import DataPlane, HttpSettings
    from proxy.l7.server import serve_listener
    from proxy.tls.downstream import https_serve_function
    from proxy.tls.listener import TlsListeners
    from proxy.tls.sessions import session_tickets_pay_off
    from proxy.tls.mesh_inbound import MeshInbound, inbound_listener_handler

    holder = SnapshotHolder()
    stats = Stats()
    # this proxy's own workload as Istio's metrics name it (source or destination labels)
    own_workload = (parse_peer_header(workload.encode()) if workload else None) or UNKNOWN_WORKLOAD
    if tracing is not None:
        # Istio's default Zipkin service name: "{app label}.{namespace}", the workload name without an app label
        app = own_workload.app if own_workload.app != UNKNOWN_WORKLOAD.app else own_workload.workload
        tracing = dataclasses.replace(tracing, service_name=f"{app}.{own_workload.namespace}")
    plane = DataPlane(holder, stats, access_log,
                      HttpSettings(max_downstream_connections=limits.max_downstream_connections,
                                   request_headers_timeout_s=request_headers_timeout_s),
                      telemetry=IstioMetrics(stats, own_workload),
                      tracing=Tracing(tracing, stats) if tracing is not None else None)
    plane.session_tickets = session_tickets_pay_off(workers)
    # the workload certificate for mutual TLS, renewed by the supervisor's control-plane client
    identity = IdentityHolder()
    plane.workload_identity = identity
    freeze_startup_objects()

    async with trio.open_nursery() as nursery, trio.open_nursery() as connections:
        # connections live in a worker-wide nursery: those of a listener a reload removes finish;
        # fire-and-forget work (mirrored requests) runs there too
        plane.background = connections
        if limits.max_rss_bytes is not None:  # the overload manager's memory watermark
            nursery.start_soon(watch_memory, MemoryWatermark(limits.max_rss_bytes, stats), plane.set_shedding, log)
        mesh = MeshInbound(plane, stats)

        async def serve(sock, name, *, task_status=trio.TASK_STATUS_IGNORED):
            # a Sidecar ingress listener: PeerAuthentication decides mesh mTLS per connection
            listener = next((l for l in holder.current.listeners if l.name == name), None)
            handler = (inbound_listener_handler(mesh, name, listener.port)
                       if listener is not None and listener.traffic_direction == "INBOUND" else None)
            await serve_listener(sock, name, plane, connection_nursery=connections, handle_connection=handler,
                                 task_status=task_status)

        # a transparent sidecar's capture listeners (virtualOutbound/virtualInbound): original
        # destination, sniffing, then the L7 pipeline on a virtual listener or the TCP proxy
        capture = CaptureServer(plane, stats, connections)
        # a Gateway's TCP servers: VirtualService tcp routes to the TCP proxy
        tls_listeners = TlsListeners(stats, identity, plane.session_tickets)
        gateway_tcp = GatewayTcpServer(plane, stats, connections, tls_listeners=tls_listeners)
        # HTTP_PROXY: Istio's explicit-proxy egress port, absolute-form targets; the L7 server takes both
        # a Gateway's HTTPS servers: TLS handshake (certificate by SNI), then the L7 server; its TLS
        # PASSTHROUGH servers: tls routes by SNI to the TCP proxy
        nursery.start_soon(tls_listeners.watch_certificates, holder)
        https = https_serve_function(plane, tls_listeners, connections)
        listeners = ListenerManager(nursery, {"HTTP": serve, "HTTP_PROXY": serve, "TCP": gateway_tcp.serve,
                                              "HTTPS": https, "TLS": gateway_tcp.serve,
                                              ORIGINAL_DST: capture.serve}, log, inherited)
        if access_log.enabled:
            nursery.start_soon(_flush_access_log, access_log)
        if plane.tracing is not None:
            nursery.start_soon(export_spans, plane.tracing.queue, plane.tracing.settings)
        draining = False
        prepared = None  # (Snapshot, BoundSockets) of a PrepareConfig awaiting its Commit or Abort

        async def _drain_then_exit(duration_s: float, idle_close_after_s: float) -> None:
            try:
                await _drain(duration_s, plane, listeners, stats, channel, log, idle_close_after_s)
            finally:  # TCP-proxied connections still open close with the worker
                nursery.cancel_scope.cancel()

        while True:
            msg = await channel.receive()
            if msg is None and hot_restart_socket is not None and not draining:
                # the supervisor died (kill -9): no outage, the next proxy takes the sockets over
                handed_over = await _orphaned(hot_restart_socket, index, listeners, stats, log)
                await _drain(drain_duration_s, plane, listeners, stats, channel, log,
                             drain_duration_s * hot_restart.IDLE_CLOSE_SHARE if handed_over else 0.0)
                break
            if msg is None or isinstance(msg, control.Shutdown):
                log.debug("worker_stopping", reason="shutdown" if msg else "control channel closed")
                break
            if isinstance(msg, control.GetStats):
                await channel.send(control.StatsReply(msg.request_id, stats.export()))
            elif isinstance(msg, control.ExportListeners):
                # duplicates for the next proxy (SCM_RIGHTS); this worker accepts on until its Drain
                exported = [] if draining else listeners.export()
                try:
                    await channel.send(control.ListenerSockets(msg.request_id, [
                        control.ListenerSocket(e.name, e.protocol, e.address, e.port) for e in exported]),
                        fds=[e.fileno for e in exported])
                except OSError as e:  # an fd the kernel refuses to pass: hand over nothing, serve on
                    log.error("worker_export_failed", error=str(e))
                    await channel.send(control.ListenerSockets(msg.request_id, []))
            elif isinstance(msg, control.LoadIdentity):
                plane.load_identity(msg.identity)
                await channel.send(control.IdentityLoaded(msg.identity.serial))
                log.debug("worker_identity_loaded", spiffe_id=msg.identity.spiffe_id, serial=msg.identity.serial)
            elif isinstance(msg, control.Drain):
                if not draining:
                    draining = True
                    nursery.start_soon(_drain_then_exit, msg.duration_s, msg.idle_close_after_s)
            elif isinstance(msg, (control.LoadConfig, control.CommitConfig)) and draining:
                log.info("worker_config_ignored", version=msg.version, reason="draining")
            elif isinstance(msg, control.PrepareConfig):
                # an update every worker applies or none: load and bind now, serve on Commit
                if prepared is not None:
                    prepared[1].close()
                    prepared = None
                try:
                    snapshot = decode_snapshot(msg.snapshot)
                except Exception as e:  # noqa: BLE001 - the supervisor validated it; report, keep serving
                    log.error("worker_config_failed", version=msg.version, error=str(e))
                    await channel.send(control.ConfigFailed(msg.version, str(e)))
                    continue
                bound, errors = await listeners.prepare(snapshot)
                if errors:
                    log.error("worker_config_unbindable", version=msg.version, errors=errors)
                    await channel.send(control.ConfigFailed(msg.version, "; ".join(errors), "listener_bind"))
                    continue
                prepared = (snapshot, bound)
                await channel.send(control.ConfigPrepared(msg.version))
            elif isinstance(msg, control.CommitConfig):
                if prepared is None or prepared[0].version != msg.version:
                    log.warning("worker_commit_unprepared", version=msg.version)
                    continue
                snapshot, bound = prepared
                prepared = None
                holder.swap(snapshot)  # first: a listener opened below must find itself in the snapshot
                errors = await listeners.reconcile(snapshot, bound)
                await channel.send(control.ConfigApplied(msg.version, listeners.names, errors))
                log.debug("worker_config_applied", version=msg.version, listeners=listeners.names)
            elif isinstance(msg, control.AbortConfig):
                if prepared is not None and prepared[0].version == msg.version:
                    prepared[1].close()
                    prepared = None
            elif isinstance(msg, control.LoadConfig):
                if msg.version != holder.current.version:
                    try:
                        snapshot = decode_snapshot(msg.snapshot)
                    except Exception as e:  # noqa: BLE001 - the supervisor validated it; report, keep serving
                        log.error("worker_config_failed", version=msg.version, error=str(e))
                        await channel.send(control.ConfigFailed(msg.version, str(e)))
                        continue
                    # swap first: a listener opened below must find itself in the snapshot it serves
                    holder.swap(snapshot)
                errors = await listeners.reconcile(holder.current)
                await channel.send(control.ConfigApplied(msg.version, listeners.names, errors))
                log.debug("worker_config_applied", version=msg.version, listeners=listeners.names)
            else:
                log.warning("worker_unexpected_message", message=type(msg).__name__)
        connections.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    # the final counts, with what the drain's last requests added since the supervisor last asked:
    # it keeps them once this process is gone (and a hot restart hands them to the next proxy)
    try:
        await channel.send(control.StatsReply(0, stats.export()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the supervisor is gone


def _tracing_settings(args: argparse.Namespace) -> TracingSettings | None:
    if args.zipkin_address is None:
        return None
    host, _, port = args.zipkin_address.rpartition(":")
    return TracingSettings(collector=(host.strip("[]"), int(port)), sampling_percent=args.trace_sampling,
                           node_id=args.node_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the supervisor decides when workers stop (Shutdown over the control channel, or the channel
    # closing): a terminal's ^C or hangup, or a service manager's SIGTERM to the whole process group,
    # goes to it, and the worker drains and flushes its access log when told
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tm_logging.configure(level=args.log_level, fmt=args.log_format, worker=args.index)
    pace_collector()
    log = tm_logging.get_logger("triomesh.worker")
    access_log = AccessLog(args.access_log, worker=args.index)
    sock = socket.socket(fileno=args.control_fd)

    async def _main() -> None:
        await run(control.ControlChannel(trio.socket.from_stdlib_socket(sock)), access_log=access_log, log=log,
                  inherited=inherited_sockets(args.inherited_sockets), hot_restart_socket=args.hot_restart_socket,
                  index=args.index, drain_duration_s=args.drain_duration_s,
                  limits=OverloadLimits(args.max_downstream_connections, args.max_worker_rss_bytes),
                  workload=args.workload, tracing=_tracing_settings(args),
                  request_headers_timeout_s=args.request_headers_timeout_s, workers=args.workers)

    try:
        trio.run(_main)
    finally:
        access_log.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
