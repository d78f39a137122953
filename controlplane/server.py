"""The control-plane server: proxy streams (Hello, snapshots, ACK/NACK, heartbeats), CLI requests, the
directory watcher and the push loop, on Trio.

Theory of operation.
- Every TCP connection starts with one message that says what it is: `Hello` opens a proxy stream;
  `ApplyRequest`, `DeleteRequest` or `StatusRequest` is a one-shot CLI request answered and closed.
- A proxy stream: Hello -> (optional workload registration) -> Welcome -> a full Snapshot at once,
  unless the Hello's `last_version` is already the proxy's view (then nothing: the proxy resumes).
  Afterwards the stream's messages (ACK/NACK/Heartbeat) are read by one task for all streams
  (controlplane/receiver.py), and the connection task sleeps until its stream ends, waking only to
  answer a CertificateRequest. One keepalive task serves every stream: every quarter interval (a
  tick) it sends a heartbeat to each stream nothing was sent on for an interval (it notices a send by
  the stream's byte count, so a heartbeat may come up to a tick late; no clock read per send), and
  closes streams nothing was received on for `heartbeat_timeout_s` (per-stream timers cost a
  cancellation each time they fire, which at thousands of proxies is most of the idle CPU). A
  protocol violation closes only that stream (the peer gets an `Error`).
- A config change (directory poll, apply/delete, a workload registered or expired, a change another
  replica stored in etcd, controlplane/replicated.py) feeds the
  `Debouncer`; when it is due, the push loop recomputes views (once per proxy class, `ViewCache`) and
  enqueues each proxy whose view version differs from what it was last sent; `push_concurrency`
  sender tasks drain the `PushQueue`. A push is a delta against the set the proxy last ACKed when the
  proxy has ACKed everything sent on this stream, else a full snapshot. A push is encoded once per
  (from version, to version) and the same bytes, nonce included, go to every proxy making that step
  (nonces only have to grow along each stream). A NACKed version is not resent:
  the proxy stays on its last good version until the config changes again.
- With a CA (`security`), every connection is TLS (controlplane/tls.py) and must prove itself in its
  first message: a proxy's Hello by a bootstrap token or a client certificate of the identity it asks
  for (controlplane/tokens.py `authorize`), a CLI request by an admin token. A refusal is an `Error`
  with UNAUTHENTICATED or PERMISSION_DENIED and the reason, then the stream closes. An admitted
  proxy's Welcome names its SPIFFE ID, and it may send CertificateRequests on the stream; they are
  signed for that identity only. A change of the CA directory (root rotation) is loaded whole or not
  at all, and every proxy admitted with an identity is sent the new TrustBundle.
- An unexpected exception while serving a stream (a bug, or input nothing anticipated) is logged
  with its traceback (`stream_failed`), counted, and ends that stream with an `Error` INTERNAL; every
  other stream and the process go on.
- A proxy that disconnects stays listed (connected=False) for `grace_period_s`, then is forgotten and
  its registered WorkloadEntry (if it registered one) is removed from the endpoints. A proxy that comes
  back within the grace period keeps its registration. Registrations restored from the data directory
  at start are such proxies, disconnected since the start: their endpoints stay while they reconnect.
  Replicated on etcd, registrations live there on each replica's lease instead (replicated.py), and
  every change of the store goes through `Replication` (await etcd, then install).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from controlplane import heap
from controlplane import tls as control_tls
from controlplane.framed import FramedStream, SendTimeout, StreamClosed, plain_socket
from controlplane.pushqueue import Debouncer, PushQueue
from controlplane.receiver import Receiver, Work
from controlplane.snapshots import ProxyClass, View, ViewCache
from controlplane.replicated import Replication
from controlplane.store import ChangeOutcome, ConfigStore, load_resources, workload_entry
from controlplane.wire import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    ApplyRequest,
    ApplyResult,
    CertificateRequest,
    DeleteRequest,
    Heartbeat,
    Hello,
    Message,
    Nack,
    ProtocolError,
    ProxyStatus,
    ResourceKey,
    Snapshot,
    StatusReply,
    StatusRequest,
    TrustBundle,
    Welcome,
    encode_frame,
)
from controlplane.security import Security
from controlplane.tokens import Refused
from proxy.config.upstream_tls import TLS_MODE_LABEL
from proxy.config.errors import ConfigError
from proxy.runner.config_watch import ConfigWatch, Deferred, files_being_written, read_complete, reopen_if_replaced, wait_file_events
from proxy.identity.spiffe import SpiffeId


@dataclass(frozen=True)
class ServerOptions:
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 30.0
    grace_period_s: float = 30.0
    debounce_quiet_s: float = 0.1
    debounce_max_s: float = 1.0
    push_concurrency: int = 256
    push_timeout_s: float = 10.0
    poll_interval_s: float = 1.0
    hello_timeout_s: float = 10.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    delta: bool = True
    # freeze long-lived objects out of the garbage collector's passes (controlplane/heap.py): a policy
    # for the whole process, so the command's own process turns it on, not an embedding test
    settle_heap: bool = False


@dataclass(eq=False)
class ProxyConn:
    """What the control plane knows about one proxy (by node id), connected or within its grace."""

    node_id: str
    namespace: str
    labels: dict[str, str]
    address: str
    service_account: str
    pc: ProxyClass
    stream: FramedStream | None = None
    session: int = 0  # bumped per stream, so a stale stream's cleanup does not touch a newer one
    connected_at: float = 0.0
    last_seen: float = 0.0
    # the stream's bytes_sent at the keepalive's last look, and since when it has not changed (the
    # keepalive sees sends a tick late at most, which saves a clock read per send)
    bytes_sent_seen: int = 0
    send_quiet_since: float = 0.0
    disconnected_at: float | None = None
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    acked: View | None = None  # the set behind acked_version (shared with every proxy of the class)
    pending: dict[str, View] = field(default_factory=dict)  # nonce -> view sent, awaiting ACK/NACK
    last_nack: str = ""
    last_nack_version: str = ""
    workload_key: ResourceKey | None = None
    admin_address: str = ""
    pushes: int = 0
    identity: SpiffeId | None = None  # with a CA: what the proxy proved it may be
    certificate_serial: str = ""  # the last certificate issued to it (hex)
    certificate_not_after: str = ""

    def status(self, now: float) -> ProxyStatus:
        return ProxyStatus(
            node_id=self.node_id,
            namespace=self.namespace,
            labels=self.labels,
            address=self.address,
            admin_address=self.admin_address,
            connected=self.stream is not None,
            sent_version=self.sent_version,
            acked_version=self.acked_version,
            last_nack=self.last_nack,
            last_nack_version=self.last_nack_version,
            connected_for_s=round(now - self.connected_at, 3) if self.stream is not None else 0.0,
            last_seen_s_ago=round(now - self.last_seen, 3),
            identity=self.identity.uri if self.identity is not None else "",
            certificate_serial=self.certificate_serial,
            certificate_not_after=self.certificate_not_after,
        )


class ControlPlane:
    def __init__(self, store: ConfigStore, options: ServerOptions, log: Any, security: Security | None = None,
                 replication: Replication | None = None) -> None:
        self.store = store
        self.replication = replication
        if replication is not None:
            replication.on_change = self.config_changed
        self.security = security
        self.options = options
        self.log = log
        self.server_id = f"{socket.gethostname()}-{os.getpid()}"
        self.proxies: dict[str, ProxyConn] = {}
        self.queue = PushQueue()
        self.receiver = Receiver()  # reads every proxy stream's ACKs, NACKs and heartbeats
        self.debouncer = Debouncer(options.debounce_quiet_s, options.debounce_max_s)
        self._changed = trio.Event()
        self._queued = trio.Event()
        self._busy = trio.Event()  # set by work that makes long-lived objects: see _settle_heap
        self._busy.set()  # start-up made some
        self._nonces = itertools.count(1)
        self._cache: ViewCache | None = None
        self._cache_generation = -1
        self.pushes_total = 0
        self._round: tuple[float, int, int] | None = None  # (start, pushes_total then, proxies queued)
        self.push_bytes_total = 0
        self.streams_failed = 0  # streams ended by an unexpected exception (logged as stream_failed)
        self._frames: dict[tuple[str, str, bool], tuple[str, bytes]] = {}  # (base, version, delta) -> (nonce, frame)
        self._frames_generation: ViewCache | None = None  # the views the frames were encoded from
        store.extra_classes = self.connected_classes
        self._nursery: trio.Nursery | None = None

    # ---- state helpers

    def connected_classes(self) -> set[ProxyClass]:
        return {p.pc for p in self.proxies.values() if p.stream is not None}

    def views(self) -> ViewCache:
        if self._cache is None or self._cache_generation != self.store.generation:
            self._cache = ViewCache(self.store.state)
            self._cache_generation = self.store.generation
        return self._cache

    def config_changed(self, reason: str) -> None:
        self.debouncer.event(trio.current_time())
        self._changed.set()
        self._busy.set()
        self.log.info("config_changed", reason=reason, version=self.store.version)

    # ---- serving

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=65535)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.replication is not None:
                await nursery.start(self.replication.run)  # start from the shared state
            else:
                self._await_restored_registrations()
            nursery.start_soon(self._push_loop)
            nursery.start_soon(self._keepalive)
            if self.options.settle_heap:
                nursery.start_soon(self._settle_heap)
            nursery.start_soon(self.receiver.run)
            for _ in range(self.options.push_concurrency):
                nursery.start_soon(self._sender)
            if self.store.config_dir is not None:
                nursery.start_soon(self._watch_directory)
            if self.security is not None:
                nursery.start_soon(self._watch_ca)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            self.log.info("controlplane_listening", address=f"{host}:{bound}", version=self.store.version,
                          resources=len(self.store.state), tls=self.security is not None)
            task_status.started(bound)

    def _await_restored_registrations(self) -> None:
        """A restored registration belongs to a proxy that was connected before the restart: it gets the
        grace period to reconnect, like a proxy whose stream just ended."""
        assert self._nursery is not None
        now = trio.current_time()
        for key, stored in self.store.workloads.items():
            if key.name in self.proxies:
                continue
            spec = stored.resource.obj.spec
            proxy = ProxyConn(key.name, key.namespace, dict(spec.labels or {}), spec.address or "",
                              spec.service_account or "", ProxyClass.of(key.namespace, spec.labels or {}),
                              workload_key=key, connected_at=now, last_seen=now, disconnected_at=now)
            self.proxies[key.name] = proxy
            self._nursery.start_soon(self._expire, proxy, proxy.session)

    async def _watch_directory(self) -> None:
        """Take the config directory's files when they changed and are complete, by the proxy's rule for
        its --config (proxy/runner/config_watch.py, docs/config-reload.md): never while a writer has
        one open, only when two reads agree."""
        path = self.store.config_dir
        assert path is not None
        watch = ConfigWatch.open(path)
        try:
            while True:
                await wait_file_events(watch, self.options.poll_interval_s)
                watch, _ = reopen_if_replaced(watch, path)
                if files_being_written(watch) or not self.store.directory_changed():
                    continue  # a writer's close wakes this loop again
                try:
                    complete = await read_complete(path, watch, self.store.read_directory)
                    if isinstance(complete, Deferred):
                        self.log.info("config_deferred", source="directory", detail=complete.detail, files=complete.files)
                        continue
                    async with self._changing():
                        changed = self.store.load_directory(complete)
                except ConfigError as e:
                    self.store.last_error = str(e)
                    self.log.error("config_rejected", source="directory", error=str(e), keeping_version=self.store.version)
                    continue
                if changed:
                    self.config_changed("directory")
        finally:
            if watch is not None:
                watch.close()

    async def _settle_heap(self) -> None:
        """After each burst of work (a change pushed, proxies connecting) and a quiet second, the
        objects it left alive are frozen out of the collector's passes (controlplane/heap.py)."""
        full_at = trio.current_time()
        while True:
            await self._busy.wait()
            while self._busy.is_set() or self._round is not None:
                self._busy = trio.Event()
                await trio.sleep(heap.QUIET_S)
            now = trio.current_time()
            full = now - full_at >= heap.FULL_COLLECT_S
            if full:
                full_at = now
            settled = heap.settle(full)
            self.log.debug("heap_settled", full=settled.full, collected=settled.collected, frozen=settled.frozen,
                           duration_ms=round(1000 * settled.duration_s, 1))

    def _changing(self) -> trio.Lock | contextlib.nullcontext:
        """Held while the store changes: replicated, a change awaits etcd between planning and installing."""
        return self.replication.lock if self.replication is not None else contextlib.nullcontext()

    async def _watch_ca(self) -> None:
        assert self.security is not None
        security = self.security
        while True:
            await trio.sleep(self.options.poll_interval_s)
            error_before = security.last_ca_error
            if security.reload_if_changed():
                self.log.info("ca_reloaded", roots=security.ca.root_fingerprints,
                              signer=security.ca.signing_certificate.subject.rfc4514_string())
                for warning in security.ca.warnings:
                    self.log.warning("ca_warning", warning=warning)
                await self._send_trust_bundle()
            elif security.last_ca_error and security.last_ca_error != error_before:
                self.log.error("ca_rejected", error=security.last_ca_error, keeping_roots=security.ca.root_fingerprints)
            if security.refresh_serving_if_due():
                self.log.info("serving_certificate_renewed", serial=format(security.serving.serial, "x"))

    async def _send_trust_bundle(self) -> None:
        assert self.security is not None
        frame = encode_frame(TrustBundle(trust_bundle=self.security.ca.trust_bundle_pem))
        for proxy in list(self.proxies.values()):
            # every proxy admitted over TLS speaks this protocol revision, also one whose certificate
            # came from before a restart of this control plane
            if proxy.stream is not None and proxy.identity is not None:
                with trio.move_on_after(self.options.push_timeout_s):
                    try:
                        await proxy.stream.send_frame(frame)
                    except StreamClosed:
                        pass

    async def _accept(self, stream: trio.SocketStream, peer: str) -> FramedStream | None:
        """The connection as a protocol stream: TLS when this control plane is a CA."""
        if self.security is None:
            return FramedStream(stream, max_frame_bytes=self.options.max_frame_bytes)
        sock = plain_socket(stream)
        try:
            tls = await control_tls.accept(sock, self.security.serving.context)
        except control_tls.TlsFailed as e:
            sock.close()
            self.log.warning("stream_tls_failed", peer=peer, error=str(e))
            return None
        except BaseException:
            sock.close()
            raise
        if tls is None:  # a plaintext peer (told so) or one that left
            sock.close()
            self.log.warning("stream_tls_required", peer=peer)
            return None
        return FramedStream(tls, max_frame_bytes=self.options.max_frame_bytes)

    def _admit_admin(self, request: ApplyRequest | DeleteRequest | StatusRequest) -> None:
        if self.security is None:
            return
        refused = self.security.admit_admin(request.token)
        if refused is not None:
            raise ProtocolError(refused.code, refused.message)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peer(stream)
        framed: FramedStream | None = None
        try:
            with trio.fail_after(self.options.hello_timeout_s):
                framed = await self._accept(stream, peer)
                if framed is None:
                    return
                first = await framed.receive()
            if isinstance(first, Hello):
                await self._proxy_stream(framed, first, peer)
            elif isinstance(first, (ApplyRequest, DeleteRequest)):
                self._admit_admin(first)
                await framed.send(await self._change(first))
            elif isinstance(first, StatusRequest):
                self._admit_admin(first)
                await framed.send(self.status())
            else:
                raise ProtocolError("UNEXPECTED_MESSAGE", f"a stream must start with hello, apply, delete or status, not {type(first).__name__}")
        except ProtocolError as e:
            self.log.warning("stream_protocol_error", peer=peer, code=e.code, error=e.message)
            assert framed is not None
            await framed.fail(e)
        except trio.TooSlowError:
            self.log.warning("stream_hello_timeout", peer=peer)
        except StreamClosed:
            pass
        except Exception:
            # a fault while serving one peer (input nothing here anticipated) ends that stream only:
            # raised further it would reach the listeners' nursery and stop every other stream too
            self.streams_failed += 1
            self.log.error("stream_failed", peer=peer, exc_info=True)
            if framed is not None:
                await framed.fail(ProtocolError("INTERNAL", "the control plane failed serving this stream "
                                                            "(logged as stream_failed); reconnect"))
        finally:
            if framed is not None:
                await framed.aclose()

    # ---- CLI requests

    async def _change(self, request: ApplyRequest | DeleteRequest) -> ApplyResult:
        sources = [(s.name, s.data) for s in request.sources]
        op = "apply" if isinstance(request, ApplyRequest) else "delete"
        try:
            outcome: ChangeOutcome
            if self.replication is None:
                outcome = self.store.apply(sources) if op == "apply" else self.store.delete(sources)
            else:
                resources = load_resources(sources)
                if op == "apply":
                    outcome = await self.replication.change(lambda: self.store.plan_apply(resources))
                else:
                    keys = [s.key for s in resources]
                    outcome = await self.replication.change(lambda: self.store.plan_delete(keys))
        except ConfigError as e:
            self.log.error("config_rejected", source=op, error=str(e), keeping_version=self.store.version)
            return ApplyResult(ok=False, config_version=self.store.version, error=str(e))
        if outcome.changed:
            self.config_changed(op)
        return ApplyResult(ok=True, config_version=self.store.version, created=outcome.created,
                           configured=outcome.configured, unchanged=outcome.unchanged, deleted=outcome.deleted)

    def status(self) -> StatusReply:
        now = trio.current_time()
        return StatusReply(config_version=self.store.version,
                           proxies=[self.proxies[k].status(now) for k in sorted(self.proxies)])

    # ---- proxy streams

    async def _proxy_stream(self, framed: FramedStream, hello: Hello, peer: str) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError("UNSUPPORTED_VERSION",
                                f"protocol version {hello.protocol_version} is not supported (this control plane speaks {PROTOCOL_VERSION})")
        if not hello.node_id:
            raise ProtocolError("BAD_HELLO", "hello needs a node_id")
        identity: SpiffeId | None = None
        if self.security is not None:
            peer_id = control_tls.peer_identity(framed.sock, self.security.trust_domain)
            admitted = self.security.admit_proxy(hello.namespace, hello.service_account, hello.token, peer_id)
            if isinstance(admitted, Refused):
                self.log.warning("proxy_refused", node_id=hello.node_id, namespace=hello.namespace,
                                 service_account=hello.service_account, peer=peer, code=admitted.code,
                                 error=admitted.message)
                raise ProtocolError(admitted.code, admitted.message)
            identity = admitted.identity
            holder = self.proxies.get(hello.node_id)
            if holder is not None and holder.identity is not None and holder.identity != identity:
                # a node id is not a credential: another identity must not replace that proxy's stream
                # or take over its registration
                self.log.warning("proxy_refused", node_id=hello.node_id, identity=identity.uri, peer=peer,
                                 code="PERMISSION_DENIED", error="node id held by another identity")
                raise ProtocolError("PERMISSION_DENIED", f"node id {hello.node_id!r} belongs to {holder.identity.uri}, "
                                                         f"not {identity.uri}")
            self.log.info("proxy_authenticated", node_id=hello.node_id, identity=identity.uri, method=admitted.method)
        now = trio.current_time()
        proxy = self.proxies.get(hello.node_id)
        if proxy is not None and proxy.stream is not None:
            # the same node again (a restarted proxy whose old connection is not yet seen as dead)
            self.log.info("proxy_replaced", node_id=hello.node_id)
            old = proxy.stream
            proxy.stream = None
            await old.aclose()
        pc = ProxyClass.of(hello.namespace, hello.labels)
        if proxy is None or proxy.pc != pc or proxy.address != hello.address:
            workload_key = proxy.workload_key if proxy is not None else None
            proxy = ProxyConn(hello.node_id, hello.namespace, dict(hello.labels), hello.address or peer.rsplit(":", 1)[0],
                              hello.service_account, pc, workload_key=workload_key)
            self.proxies[hello.node_id] = proxy
        proxy.session += 1
        session = proxy.session
        proxy.identity = identity
        proxy.admin_address = hello.admin_address
        proxy.stream = framed
        proxy.connected_at = proxy.last_seen = proxy.send_quiet_since = now
        proxy.bytes_sent_seen = 0
        proxy.disconnected_at = None
        self._busy.set()
        proxy.pending.clear()
        proxy.acked = None  # a new stream starts from a full snapshot
        proxy.sent_version = proxy.acked_version = proxy.sent_nonce = ""  # nonces grow per stream
        self.log.info("proxy_connected", node_id=hello.node_id, namespace=hello.namespace, labels=hello.labels,
                      peer=peer, serving=hello.last_version)
        if hello.register:
            await self._register(proxy, hello)
        elif proxy.workload_key is not None:  # it registered before and no longer asks to be
            await self._unregister(proxy.workload_key, "workload_unregistered")
            proxy.workload_key = None
        try:
            await framed.send(Welcome(server_id=self.server_id, heartbeat_interval_s=self.options.heartbeat_interval_s,
                                      issues_certificates=identity is not None,
                                      identity=identity.uri if identity is not None else ""))
            if not self._resume(proxy, hello.last_version):
                await self.push(proxy, force_full=True)
            await self.receiver.receive(framed, functools.partial(self._on_message, proxy, framed))
        finally:
            if proxy.session == session:
                proxy.stream = None
                proxy.disconnected_at = trio.current_time()
                self.queue.remove(proxy.node_id)
                self.log.info("proxy_disconnected", node_id=proxy.node_id, acked_version=proxy.acked_version)
                if self._nursery is not None:
                    self._nursery.start_soon(self._expire, proxy, session)

    def _resume(self, proxy: ProxyConn, serving: str) -> bool:
        """A proxy that already serves its current view (it reconnects after a restart of this control
        plane or of another replica) is sent nothing: what it holds counts as ACKed, the base of the
        next delta. Versions are content hashes, so an equal version means the same resources."""
        view = self.views().view(proxy.pc)
        if not serving or serving != view.version:
            return False
        proxy.sent_version = proxy.acked_version = view.version
        proxy.acked = view
        self.log.info("proxy_resumed", node_id=proxy.node_id, version=view.version)
        return True

    async def _register(self, proxy: ProxyConn, hello: Hello) -> None:
        labels = dict(hello.labels)
        # the account its certificate proves (a proxy that named none gets `default`'s): the
        # endpoint's serviceAccount, which clients' ISTIO_MUTUAL accepts as the server
        service_account = proxy.identity.service_account if proxy.identity is not None else hello.service_account
        if proxy.identity is not None:
            # a sidecar that gets a workload certificate takes mesh mTLS: Istio's endpoint label,
            # which auto mTLS on the client side follows (docs/mtls.md)
            labels[TLS_MODE_LABEL] = "istio"
        try:
            if self.replication is not None:
                entry = workload_entry(hello.node_id, hello.namespace, labels, proxy.address, hello.ports,
                                       service_account)
                await self.replication.register(entry, replaces=proxy.workload_key)
                key = entry.key
            else:
                key = self.store.register_workload(hello.node_id, hello.namespace, labels, proxy.address,
                                                   hello.ports, service_account)
        except ConfigError as e:
            self.log.error("workload_registration_refused", node_id=hello.node_id, error=str(e))
            return
        if self.replication is None and proxy.workload_key is not None and proxy.workload_key != key:
            self.store.unregister_workload(proxy.workload_key)
        proxy.workload_key = key
        self.config_changed("workload_registered")

    async def _unregister(self, key: ResourceKey, reason: str) -> None:
        if self.replication is not None:
            await self.replication.unregister(key, reason)  # reports its own change
        elif self.store.unregister_workload(key):
            self.config_changed(reason)

    async def _expire(self, proxy: ProxyConn, session: int) -> None:
        await trio.sleep(self.options.grace_period_s)
        if proxy.session != session or proxy.stream is not None or self.proxies.get(proxy.node_id) is not proxy:
            return  # it came back
        del self.proxies[proxy.node_id]
        self.log.info("proxy_expired", node_id=proxy.node_id)
        if proxy.workload_key is not None:
            await self._unregister(proxy.workload_key, "workload_expired")

    async def _keepalive(self) -> None:
        interval = self.options.heartbeat_interval_s
        timeout = self.options.heartbeat_timeout_s
        tick = min(interval, timeout) / 4
        seq = 0
        while True:
            await trio.sleep(tick)
            seq += 1
            frame = encode_frame(Heartbeat(seq=seq))
            now = trio.current_time()
            for i, proxy in enumerate(list(self.proxies.values())):
                if i % 256 == 255:
                    await trio.lowlevel.checkpoint()  # sends below rarely wait: let the other tasks in
                framed = proxy.stream
                if framed is None:
                    continue
                if now - proxy.last_seen > timeout:
                    self.log.warning("proxy_heartbeat_timeout", node_id=proxy.node_id)
                    assert self._nursery is not None
                    self._nursery.start_soon(framed.fail, ProtocolError("HEARTBEAT_TIMEOUT", f"nothing received for {timeout}s"))
                    continue
                if framed.bytes_sent != proxy.bytes_sent_seen:
                    proxy.bytes_sent_seen = framed.bytes_sent
                    proxy.send_quiet_since = now
                elif now - proxy.send_quiet_since >= interval - tick and not framed.sending:
                    # a peer whose buffer stays full is not reading: it does not stall the rest for
                    # longer than a tick (the heartbeat timeout deals with it)
                    try:
                        await framed.send_frame(frame, timeout_s=tick)
                    except StreamClosed:
                        pass

    def _on_message(self, proxy: ProxyConn, framed: FramedStream, message: Message) -> Work | None:
        """A message on a proxy stream (called by the shared `Receiver`, so it must not block: what
        has to await is returned, to run in the stream's task)."""
        proxy.last_seen = self.receiver.now
        if isinstance(message, Ack):
            view = proxy.pending.pop(message.nonce, None)
            if view is None or view.version != message.version:
                raise ProtocolError("UNKNOWN_NONCE", f"ack for nonce {message.nonce!r} version {message.version!r} that was not sent")
            if proxy.pending:
                self._drop_older(proxy, message.nonce)
            proxy.acked_version = view.version
            proxy.acked = view
        elif isinstance(message, Heartbeat):
            pass
        elif isinstance(message, CertificateRequest):
            return functools.partial(self._sign, proxy, framed, message)
        elif isinstance(message, Nack):
            view = proxy.pending.pop(message.nonce, None)
            if view is None:
                raise ProtocolError("UNKNOWN_NONCE", f"nack for nonce {message.nonce!r} that was not sent")
            self._drop_older(proxy, message.nonce)
            proxy.last_nack = message.error
            proxy.last_nack_version = message.version
            self.log.error("proxy_nack", node_id=proxy.node_id, version=message.version,
                           serving=message.serving_version, error=message.error)
        else:
            raise ProtocolError("UNEXPECTED_MESSAGE", f"{type(message).__name__} is not valid on a proxy stream")
        return None

    async def _sign(self, proxy: ProxyConn, framed: FramedStream, request: CertificateRequest) -> None:
        if self.security is None or proxy.identity is None:
            raise ProtocolError("UNEXPECTED_MESSAGE", "this control plane does not issue certificates")
        signed = self.security.sign(request.request_id, request.csr, proxy.identity)
        if signed.issued is None:
            self.log.warning("certificate_refused", node_id=proxy.node_id, identity=proxy.identity.uri,
                             code=signed.reply.error_code, error=signed.reply.error)
        else:
            proxy.certificate_serial = format(signed.issued.serial, "x")
            proxy.certificate_not_after = signed.issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
            self.log.info("certificate_issued", node_id=proxy.node_id, identity=proxy.identity.uri,
                          serial=proxy.certificate_serial, not_after=proxy.certificate_not_after)
        await framed.send(signed.reply)

    @staticmethod
    def _drop_older(proxy: ProxyConn, nonce: str) -> None:
        # an answer to a push implies the proxy processed every earlier one (they are answered in order)
        n = int(nonce)
        for k in [k for k in proxy.pending if int(k) < n]:
            del proxy.pending[k]

    # ---- pushing

    async def push(self, proxy: ProxyConn, *, force_full: bool = False) -> bool:
        """Send the proxy its current view if it differs from what it was last sent. Raises
        StreamClosed (SendTimeout after `push_timeout_s` waiting for a peer that does not read)."""
        framed = proxy.stream
        if framed is None:
            return False
        views = self.views()
        view = views.view(proxy.pc)
        if view.version == proxy.sent_version and not force_full:
            return False
        incremental = (
            self.options.delta and not force_full and proxy.acked is not None and not proxy.pending
            and proxy.acked_version == proxy.sent_version
        )
        nonce, frame = self._frame(views, proxy, view, incremental)
        proxy.pending[nonce] = view
        proxy.sent_version = view.version
        proxy.sent_nonce = nonce
        await framed.send_frame(frame, timeout_s=self.options.push_timeout_s)
        proxy.pushes += 1
        self.pushes_total += 1
        self.push_bytes_total += len(frame)
        return True

    def _frame(self, views: ViewCache, proxy: ProxyConn, view: View, incremental: bool) -> tuple[str, bytes]:
        """The encoded Snapshot and its nonce. Every proxy going from the same version to the same
        version gets the same bytes, so a change is encoded once per (from, to) pair, not per proxy.
        Nonces need only grow along each stream: a shared one is reused unless this proxy was already
        sent a newer nonce."""
        base = proxy.acked_version if incremental else ""
        cache_key = (base, view.version, incremental)
        if self._frames_generation is not views:
            self._frames.clear()
            self._frames_generation = views
        cached = self._frames.get(cache_key)
        if cached is not None and (not proxy.sent_nonce or int(proxy.sent_nonce) < int(cached[0])):
            return cached
        nonce = str(next(self._nonces))
        if incremental:
            assert proxy.acked is not None
            changed, removed = views.delta(proxy.acked, view)
            message = Snapshot(version=view.version, nonce=nonce, full=False, base_version=base,
                               resources=[s.wire for s in changed], removed=removed)
        else:
            message = Snapshot(version=view.version, nonce=nonce, full=True, resources=[s.wire for s in view.resources])
        encoded = self._frames[cache_key] = (nonce, encode_frame(message))
        return encoded

    async def _push_loop(self) -> None:
        while True:
            due = self.debouncer.due_at()
            if due is None:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            with trio.move_on_at(due):
                await self._changed.wait()
            self._changed = trio.Event()
            merged = self.debouncer.take(trio.current_time())
            if not merged:
                continue
            views = self.views()
            queued = 0
            for proxy in self.proxies.values():
                if proxy.stream is not None and views.view(proxy.pc).version != proxy.sent_version:
                    self.queue.enqueue(proxy.node_id)
                    queued += 1
            self.log.info("push_started", version=self.store.version, changes=merged, proxies=queued)
            if queued:
                self._round = (trio.current_time(), self.pushes_total, queued)
                self._queued.set()

    async def _sender(self) -> None:
        served = 0
        while True:
            node_id = self.queue.pop()
            served += 1
            if served % 32 == 0:
                await trio.lowlevel.checkpoint()  # a push that fits the socket buffer does not yield
            if node_id is None:
                if self._queued.is_set():
                    self._queued = trio.Event()  # the enqueuer sets the current one
                await self._queued.wait()
                continue
            proxy = self.proxies.get(node_id)
            try:
                if proxy is not None and proxy.stream is not None:
                    await self.push(proxy)
            except SendTimeout:
                self.log.warning("push_timeout", node_id=node_id)
                if proxy is not None and proxy.stream is not None:
                    await proxy.stream.aclose()  # a proxy that does not read its config is not served
            except StreamClosed:
                pass
            finally:
                self.queue.done(node_id)
                if len(self.queue):
                    self._queued.set()  # it was enqueued again while this push was in flight
                elif not self.queue.in_flight and self._round is not None:
                    started, pushes_before, queued = self._round
                    self._round = None
                    self._busy.set()
                    self.log.info("push_done", version=self.store.version, queued=queued,
                                  pushed=self.pushes_total - pushes_before,
                                  duration_ms=round(1000 * (trio.current_time() - started), 1))


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
