"""The proxy's client of the control plane: one long-lived stream that turns Snapshots into applied
config, answered by ACK or NACK.

Theory of operation. `run_client` loops forever: connect to one of the control-plane replicas
(proxy/xds/failover.py picks the order; exponential back-off with full jitter while none is
reachable), send Hello (node identity and the version served now: a control plane whose view has
that version sends no snapshot), wait for Welcome, then receive. Each Snapshot is turned into the complete resource set it stands for (a full
snapshot replaces the set; a delta applies changed/removed on top of the set it names as its base),
every resource body is checked by the loader's own conversion, and the set goes to `on_resources`.
If that returns (or its awaitable completes), the proxy serves the new version: ACK. If it raises (a
ConfigError from compiling, or anything else), the proxy keeps its previous config: NACK with the
error text. Heartbeats go out every interval the Welcome names; nothing received for three intervals
ends the stream, and the loop reconnects. While disconnected nothing changes: the proxy serves its
last good config, and the next stream starts with a full snapshot (resync).

With `credentials` naming the control plane's root, the stream is TLS (the control plane's certificate
and host name verified) and Hello carries the bootstrap token; the current workload certificate, while
valid, is shown as the TLS client certificate, which proves the identity without the token. When the
Welcome says the control plane issues certificates, the `IdentityManager` keeps the proxy's identity
fresh over the stream (proxy/identity/manager.py).
"""

from __future__ import annotations

import inspect
import itertools
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from controlplane import tls as control_tls
from controlplane.framed import FramedStream, StreamClosed
from controlplane.wire import (
    MAX_FRAME_BYTES,
    Ack,
    CertificateReply,
    CertificateRequest,
    Error,
    Heartbeat,
    Hello,
    Nack,
    ProtocolError,
    ResourceKey,
    Snapshot,
    TrustBundle,
    Welcome,
    decode_istio,
)
from proxy.config.errors import ConfigError
from proxy.config.load import Resource
from proxy.identity.manager import IdentityManager
from proxy.xds.failover import ControlPlaneAddress, ControlPlaneEndpoint, Rotation, endpoints_of, parse_addresses
from proxy.xds.hold import ReconnectHold

OnResources = Callable[[list[Resource], str], "None | Awaitable[None]"]


@dataclass(frozen=True)
class NodeInfo:
    """Who this proxy is: Hello's fields. With `register`, the control plane adds the workload
    (address, labels, ports, service account) as a WorkloadEntry while the proxy is connected."""

    node_id: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = ""
    address: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    register: bool = False
    admin_address: str = ""  # HOST:PORT of this proxy's admin listener (shown by proxy-status/proxy-config)

    @classmethod
    def default(cls, **kw: Any) -> "NodeInfo":
        return cls(node_id=kw.pop("node_id", f"{socket.gethostname()}.{os.getpid()}"), **kw)


@dataclass(frozen=True)
class Credentials:
    """How the proxy meets a control plane that serves TLS: the roots that verify it (PEM; None:
    plaintext) and the bootstrap token that proves the proxy may take its identity."""

    controlplane_roots_pem: bytes | None = None
    token: str = ""

    def __repr__(self) -> str:  # keep the token out of logs and tracebacks
        return f"Credentials(tls={self.controlplane_roots_pem is not None}, token={'set' if self.token else 'none'})"


PLAINTEXT = Credentials()


@dataclass(frozen=True)
class ClientOptions:
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    welcome_timeout_s: float = 10.0
    heartbeat_misses: float = 3.0  # intervals of silence before the stream is considered dead
    max_frame_bytes: int = MAX_FRAME_BYTES


@dataclass
class ClientState:
    """What the client knows, for the admin endpoint and tests."""

    connected: bool = False
    address: str = ""  # the replica connected to last
    server_id: str = ""
    version: str = ""  # the version applied (ACKed) last; kept across reconnects
    resources: dict[ResourceKey, Resource] = field(default_factory=dict, repr=False)
    connects: int = 0
    acks: int = 0
    nacks: int = 0
    last_error: str = ""  # the last NACK's text
    last_disconnect: str = ""
    tls: bool = False
    identity: str = ""  # the SPIFFE ID the control plane admitted this proxy as ("" without a CA)


def addresses_of(address: str | tuple[str, int] | Sequence[ControlPlaneAddress]) -> tuple[ControlPlaneAddress, ...]:
    """`host:port[,host:port...]`, one (host, port), or addresses already parsed."""
    if isinstance(address, str):
        return parse_addresses(address)
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        return (ControlPlaneAddress(str(address[0]), address[1]),)
    return tuple(address)  # type: ignore[arg-type]


async def resolve(addresses: Sequence[ControlPlaneAddress], log: Any) -> list[ControlPlaneEndpoint]:
    """Every address's current IP addresses (a name may stand for several replicas); a name that does
    not resolve now is skipped for this round."""
    out: list[ControlPlaneEndpoint] = []
    for address in addresses:
        try:
            infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("controlplane_unresolved", address=str(address), error=str(e))
            continue
        out.extend(endpoints_of(address, (info[4][0] for info in infos)))
    return out


def backoff_delays(initial_s: float, max_s: float, rng: random.Random):
    """Full jitter (a uniform delay up to an exponentially growing cap): reconnecting proxies spread out."""
    for attempt in itertools.count():
        yield rng.uniform(0, min(max_s, initial_s * 2.0 ** min(attempt, 64)))  # bounded: a long outage must not overflow


class _Resync(Exception):
    """The stream cannot continue (a delta on a base we do not have); reconnect for a full snapshot."""


def _key(r: Resource) -> ResourceKey:
    return ResourceKey(r.kind, r.namespace, r.name)


def build_resource_set(message: Snapshot, current: dict[ResourceKey, Resource], current_version: str) -> dict[ResourceKey, Resource]:
    """The full resource set a Snapshot stands for. Raises ConfigError (a body the loader refuses) or
    _Resync (a delta whose base is not what we serve)."""
    if message.full:
        out: dict[ResourceKey, Resource] = {}
    else:
        if message.base_version != current_version:
            raise _Resync(f"delta on base {message.base_version!r} but serving {current_version!r}")
        out = dict(current)
        for k in message.removed:
            out.pop(k, None)
    for w in message.resources:
        r = decode_istio(w.body, file=w.file, document=w.document)
        out[_key(r)] = r
    return out


async def run_client(
    address: str | tuple[str, int] | Sequence[ControlPlaneAddress],
    node: NodeInfo,
    on_resources: OnResources,
    *,
    options: ClientOptions = ClientOptions(),
    log: Any = None,
    rng: random.Random | None = None,
    credentials: Credentials = PLAINTEXT,
    identity: IdentityManager | None = None,
    hold: ReconnectHold | None = None,
    task_status: trio.TaskStatus[ClientState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled. `task_status.started(state)` comes at once (the proxy serves whatever it
    has while the first connection is being made); `state` is updated as the client works. With
    several addresses (or a name resolving to several), a stream that ends moves the proxy to the
    next replica (proxy/xds/failover.py)."""
    if log is None:
        from proxy.logging import get_logger

        log = get_logger("triomesh.xds")
    addresses = addresses_of(address)
    state = ClientState(tls=credentials.controlplane_roots_pem is not None)
    task_status.started(state)
    rng = rng or random.Random()
    rotation = Rotation(rng)
    delays = backoff_delays(options.backoff_initial_s, options.backoff_max_s, rng)
    while True:
        welcomed = False
        for endpoint in rotation.order(await resolve(addresses, log)):
            if hold is not None and hold.held:
                log.info("controlplane_reconnect_held", reason="hot_restart", serving=state.version)
                await hold.wait_released()
            stream = await _connect(endpoint, options, credentials, identity, state, log)
            if stream is None:
                continue
            rotation.used(endpoint)
            state.address = str(endpoint)
            framed = FramedStream(stream, max_frame_bytes=options.max_frame_bytes)
            try:
                welcomed = await _session(framed, node, on_resources, state, options, log, credentials.token, identity)
                reason = "closed"
            except (StreamClosed, ProtocolError, _Resync, trio.TooSlowError) as e:
                welcomed = state.connected
                reason = f"{type(e).__name__}: {e}"
            finally:
                state.connected = False
                await framed.aclose()
            state.last_disconnect = reason
            log.warning("controlplane_disconnected", address=str(endpoint), reason=reason, serving=state.version)
            if welcomed:
                break
        if welcomed:
            # it was healthy: start the back-off over, and try the next replica after a short jittered pause
            # (every proxy of a replica that went away reconnects at once otherwise)
            delays = backoff_delays(options.backoff_initial_s, options.backoff_max_s, rng)
        await trio.sleep(next(delays))


async def _connect(endpoint: ControlPlaneEndpoint, options: ClientOptions, credentials: Credentials,
                   identity: IdentityManager | None, state: ClientState, log: Any):
    """A stream to one replica, or None (logged) when it cannot be had now."""
    try:
        with trio.fail_after(options.connect_timeout_s):
            if credentials.controlplane_roots_pem is not None:
                context = control_tls.client_context(credentials.controlplane_roots_pem,
                                                     identity.usable_now() if identity is not None else None)
                return await control_tls.connect(endpoint.ip, endpoint.port, context, server_name=endpoint.server_name)
            return await trio.open_tcp_stream(endpoint.ip, endpoint.port)
    except control_tls.TlsFailed as e:  # not a network blip: the wrong root, or not a TLS port
        state.last_disconnect = f"TLS handshake failed: {e}"
        log.warning("controlplane_tls_failed", address=str(endpoint), error=str(e))
    except (OSError, trio.TooSlowError) as e:
        log.debug("controlplane_unreachable", address=str(endpoint), error=str(e) or type(e).__name__,
                  serving=state.version)
    return None


async def _session(framed: FramedStream, node: NodeInfo, on_resources: OnResources, state: ClientState,
                   options: ClientOptions, log: Any, token: str, identity: IdentityManager | None) -> bool:
    await framed.send(Hello(node_id=node.node_id, namespace=node.namespace, labels=dict(node.labels),
                            service_account=node.service_account, address=node.address, ports=dict(node.ports),
                            register=node.register, last_version=state.version,
                            admin_address=node.admin_address, token=token))
    with trio.fail_after(options.welcome_timeout_s):
        welcome = await framed.receive()
    if isinstance(welcome, Error):
        raise ProtocolError(welcome.code, f"control plane refused the stream: {welcome.message}")
    if not isinstance(welcome, Welcome):
        raise ProtocolError("UNEXPECTED_MESSAGE", f"expected welcome, got {type(welcome).__name__}")
    state.connected = True
    state.server_id = welcome.server_id
    state.connects += 1
    state.identity = welcome.identity
    interval = welcome.heartbeat_interval_s
    log.info("controlplane_connected", server_id=welcome.server_id, serving=state.version,
             identity=welcome.identity or None)
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_heartbeats, framed, interval)
        if welcome.issues_certificates and identity is not None:
            async def send_request(request_id: int, csr_pem: bytes) -> None:
                await framed.send(CertificateRequest(request_id=request_id, csr=csr_pem))

            nursery.start_soon(_renewals, identity, welcome.identity, send_request)
        try:
            await _receive_loop(framed, on_resources, state, interval * options.heartbeat_misses, log, identity)
        except (StreamClosed, ProtocolError, _Resync, trio.TooSlowError) as e:
            error = e  # re-raised outside the nursery, unwrapped
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return True


async def _renewals(identity: IdentityManager, identity_uri: str, send_request) -> None:
    try:
        await identity.run_on_stream(identity_uri, send_request)
    except StreamClosed:
        pass  # the receive loop sees the stream end too, and reconnects


async def _heartbeats(framed: FramedStream, interval_s: float) -> None:
    for seq in itertools.count(1):
        await trio.sleep(interval_s)
        try:
            await framed.send(Heartbeat(seq=seq))
        except StreamClosed:
            return


async def _receive_loop(framed: FramedStream, on_resources: OnResources, state: ClientState, timeout_s: float, log: Any,
                        identity: IdentityManager | None) -> None:
    while True:
        with trio.fail_after(timeout_s):
            message = await framed.receive()
        if isinstance(message, Heartbeat):
            continue
        if isinstance(message, CertificateReply):
            if identity is not None:
                identity.deliver(message.request_id, message)
            continue
        if isinstance(message, TrustBundle):  # a client without an identity has no bundle to update
            if identity is not None:
                await identity.update_trust_bundle(message.trust_bundle)
            continue
        if isinstance(message, Error):
            raise ProtocolError(message.code, f"control plane closed the stream: {message.message}")
        if not isinstance(message, Snapshot):
            await framed.fail(ProtocolError("UNEXPECTED_MESSAGE", f"{type(message).__name__} is not valid from a control plane"))
            raise ProtocolError("UNEXPECTED_MESSAGE", type(message).__name__)
        if message.full and message.version == state.version and state.acks:
            # a resync after a reconnect that brings what we serve already: nothing to apply
            await framed.send(Ack(version=message.version, nonce=message.nonce))
            continue
        try:
            resources = build_resource_set(message, state.resources, state.version)
            result = on_resources(list(resources.values()), message.version)
            if inspect.isawaitable(result):
                await result
        except _Resync:
            raise
        except Exception as e:  # noqa: BLE001 - any refusal is a NACK; the proxy keeps serving what it has
            text = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            state.nacks += 1
            state.last_error = text
            log.error("snapshot_rejected", version=message.version, error=text, serving=state.version)
            await framed.send(Nack(version=message.version, nonce=message.nonce, error=text, serving_version=state.version))
            continue
        state.resources = resources
        state.version = message.version
        state.acks += 1
        log.info("snapshot_applied", version=message.version, resources=len(resources), full=message.full)
        await framed.send(Ack(version=message.version, nonce=message.nonce))
