"""A worker's live TLS state for its HTTPS listeners: one TlsContext per terminating server, chosen by
SNI during the handshake, reloaded when its certificate files change, and the handshake counters.

Theory of operation
-------------------
A listener's servers come from the snapshot (`Listener.tls_servers`, in Gateway order). Every new
connection starts on the default server's context (the catch-all server `*` if there is one, else
the first): that is what a client without SNI gets. OpenSSL calls `_on_server_name` with the
ClientHello's SNI; it picks the server (exact name, then the longest `*.suffix`, then the catch-all)
and moves the connection to that server's context before the certificate is sent. A name no server takes fails the
handshake with the unrecognized_name alert, as Envoy closes a connection that matches no filter
chain.

Reload: once a second (`TlsListeners.watch_certificates`), each server's certificate source is asked
for its fingerprint (file identity, size, mtime); a change rebuilds that server's context. New
handshakes get the new certificate; connections already up keep theirs (nothing is dropped). A
rebuild that fails (a half-written file, a key that no longer matches) keeps the last good context,
is counted (`triomesh_tls_certificate_reload_total{result="failure"}`) and logged, and is tried again
on the next change.

A listener's runtime is kept across config reloads while its servers are unchanged.
"""

from __future__ import annotations

import datetime
from time import monotonic
import structlog
import trio

from proxy.config.snapshot import Listener, ServerTls, Snapshot
from proxy.l4.sniff_stream import sniff_socket
from proxy.stats import HELP, Counter, Stats
from proxy.tls import mesh
from proxy.tls.certificates import (CertificateSource, WorkloadSource, certificate_source, describe_chain,
                                    describe_chain_pem)
from proxy.tls.context import (ALPN_PROTOCOLS, TLS1_3, ProtocolVersions, TlsContext, TlsSettingsError,
                               check_versions, context_for_server)
from proxy.tls.openssl import OpenSslError

log = structlog.get_logger("triomesh.tls")

RELOAD_CHECK_PERIOD_S = 1.0
# Envoy's transport_socket_connect_timeout is off by default, Istio sets none on gateways; a bound
# keeps a client that opens a connection and says nothing from holding it for the idle timeout
HANDSHAKE_TIMEOUT_S = 10.0
# TLS alerts (RFC 8446 6.2) that refuse a handshake from the SNI callback
ALERT_UNRECOGNIZED_NAME = 112
ALERT_INTERNAL_ERROR = 80

HELP.setdefault("triomesh_tls_handshake_total", "Completed downstream TLS handshakes, by listener (Envoy's ssl.handshake).")
HELP.setdefault("triomesh_tls_session_reused_total",
                "Downstream TLS handshakes that resumed a session (a ticket), by listener (Envoy's ssl.session_reused).")
HELP.setdefault("triomesh_tls_handshake_error_total",
                "Downstream TLS handshakes that failed, by listener and reason (Envoy's ssl.connection_error, "
                "ssl.fail_verify_no_cert, ssl.fail_verify_error, ...).")
HELP.setdefault("triomesh_tls_certificate_reload_total",
                "Certificate reloads after their files changed, by certificate file and result (success, failure: "
                "the last good certificate stays in use).")
HELP.setdefault("triomesh_tls_certificate_expiration_timestamp_seconds",
                "Expiry (Unix time) of the certificate a terminating server presents, by certificate file.")


class ServerCertificate:
    """One terminating server's current context and where it comes from."""

    __slots__ = ("server", "source", "context", "fingerprint", "last_error")

    def __init__(self, server: ServerTls, source: CertificateSource) -> None:
        self.server = server
        self.source = source
        self.context: TlsContext | None = None
        self.fingerprint: tuple = ()  # of the files last tried, loaded or not
        self.last_error = ""  # why the last try failed ("" when it loaded)


def _workload_context(server: ServerTls, source: WorkloadSource):
    """An ISTIO_MUTUAL server's context from the workload certificate of now (ValueError without one)."""
    identity = source.holder.current if source.holder is not None else None
    if identity is None:
        raise ValueError("ISTIO_MUTUAL: this proxy has no workload certificate yet (it needs --controlplane with "
                         "the mesh CA)")
    context = mesh.server_context(identity, ALPN_PROTOCOLS,
                                  ProtocolVersions(server.min_protocol_version, server.max_protocol_version),
                                  server.cipher_suites)
    return context, describe_chain_pem(identity.certificate_chain_pem)[0]


def _version_range(server: ServerTls) -> tuple[int, int] | None:
    """The protocol versions `server` takes (None when they are refused: it loads no context)."""
    try:
        minimum, maximum = check_versions(ProtocolVersions(server.min_protocol_version, server.max_protocol_version))
    except TlsSettingsError:
        return None
    return minimum, maximum or TLS1_3  # TLS_AUTO's maximum is the highest, 1.3


class ListenerTls:
    """The TLS runtime of one HTTPS listener."""

    def __init__(self, listener_name: str, servers: tuple[ServerTls, ...], stats: Stats, identity=None,
                 session_tickets: bool = True) -> None:
        self.listener_name = listener_name
        self.session_tickets = session_tickets  # resumable tickets (proxy/tls/sessions.py), one server only
        self.stats = stats
        self.tls_servers = servers  # what the runtime was made from (TlsListeners compares it)
        # ISTIO_MUTUAL servers present the workload certificate (`identity`, an IdentityHolder)
        self.servers = [ServerCertificate(s, WorkloadSource(s.certificate, identity) if s.mode == "ISTIO_MUTUAL"
                                          else certificate_source(s.certificate)) for s in servers]
        self.exact: dict[str, int] = {}
        self.suffixes: list[tuple[str, int]] = []  # (".example.com", index), longest first
        self.catch_all: int | None = None
        for index, entry in enumerate(self.servers):
            for name in entry.server.server_names:
                if name == "*":
                    self.catch_all = index if self.catch_all is None else self.catch_all
                elif name.startswith("*."):
                    self.suffixes.append((name[1:], index))
                else:
                    self.exact.setdefault(name, index)
        self.suffixes.sort(key=lambda item: -len(item[0]))
        self.default_index = self.catch_all if self.catch_all is not None else 0
        # OpenSSL settles the protocol version with the context a connection starts on, before the
        # SNI callback picks the server: when the servers of the port take different versions, the
        # connection starts on its server's context, picked from the ClientHello's SNI read first
        self.pick_before_handshake = len({_version_range(s) for s in servers}) > 1
        self._handshakes = stats.counter("triomesh_tls_handshake_total", listener=listener_name)
        self._sessions_reused = stats.counter("triomesh_tls_session_reused_total", listener=listener_name)
        self._errors: dict[str, Counter] = {}
        for entry in self.servers:
            self._load(entry, initial=True)

    def count_handshake(self, conn) -> None:
        """A completed handshake of `conn` (a TlsConn), and whether it resumed a session."""
        self._handshakes.value += 1
        if conn.session_reused:
            self._sessions_reused.value += 1

    # ---- certificates

    def _load(self, entry: ServerCertificate, *, initial: bool = False) -> None:
        fingerprint = entry.source.fingerprint()
        files = entry.source.files
        label = files.cert_file or files.origin  # the workload certificate has no file
        try:
            if isinstance(entry.source, WorkloadSource):
                context, expiry = _workload_context(entry.server, entry.source)
            else:
                context = context_for_server(entry.server, files)
                expiry = describe_chain(files.cert_file)[0]
        except (TlsSettingsError, OSError, ValueError) as e:
            entry.fingerprint = fingerprint  # retried on the next change, not on every connection
            entry.last_error = str(e)
            if not initial:
                self.stats.counter("triomesh_tls_certificate_reload_total", certificate=label,
                                   result="failure").value += 1
            log.error("tls certificate not loaded; keeping the last good one" if entry.context is not None else
                      "tls certificate not loaded", listener=self.listener_name, certificate=label,
                      origin=files.origin, error=str(e))
            return
        if len(self.servers) > 1 or self.catch_all is None:
            # the SNI callback picks another server or refuses a name; one server taking every name
            # (`*`) does neither, so its handshakes skip the call into Python
            context.set_server_name_handler(self._on_server_name)
        if len(self.servers) > 1 or not self.session_tickets:
            # OpenSSL resumes a session with the first context's tickets and cache, before SNI picks
            # the server: a session made for one server (none or another CA for client
            # certificates) must never pass for another, so a port of several servers resumes none
            context.without_session_tickets()
        entry.context = context
        entry.fingerprint = fingerprint
        entry.last_error = ""
        self.stats.gauge("triomesh_tls_certificate_expiration_timestamp_seconds", certificate=label).value = int(
            datetime.datetime.fromisoformat(expiry.expiration_time).timestamp())
        if not initial:
            self.stats.counter("triomesh_tls_certificate_reload_total", certificate=label,
                               result="success").value += 1
            log.info("tls certificate reloaded", listener=self.listener_name, certificate=label,
                     origin=files.origin, subject=expiry.subject, expires=expiry.expiration_time)

    def maybe_reload(self) -> None:
        """Rebuild the contexts whose certificate changed."""
        for entry in self.servers:
            if entry.source.fingerprint() != entry.fingerprint:
                self._load(entry)

    # ---- handshakes

    def initial_context(self) -> TlsContext | None:
        """The context a new connection starts with (the default server's); None when no server has
        a usable certificate."""
        entry = self.servers[self.default_index]
        if entry.context is not None:
            return entry.context
        return next((e.context for e in self.servers if e.context is not None), None)

    async def starting_context(self, sock) -> tuple[TlsContext | None, bytes, float]:
        """The context a new connection on `sock` starts on (None: no server has a certificate), the
        ciphertext read to choose it (for the handshake to take first) and the handshake's timeout:
        what is left of HANDSHAKE_TIMEOUT_S, which includes that read."""
        if not self.pick_before_handshake:
            return self.initial_context(), b"", HANDSHAKE_TIMEOUT_S
        started = monotonic()
        sock.setblocking(False)  # an accepted socket may still block (TlsConn would set this later)
        detection, client_hello = await sniff_socket(sock, timeout_s=HANDSHAKE_TIMEOUT_S)
        return self.context_for(detection.sni), client_hello, max(0.0, HANDSHAKE_TIMEOUT_S - (monotonic() - started))

    def context_for(self, server_name: str | None) -> TlsContext | None:
        """The context a connection whose ClientHello names `server_name` starts on (pick_before_handshake):
        its server's; the initial one when no server takes the name (the SNI callback refuses it)."""
        index = self.pick(server_name)
        context = self.servers[index].context if index is not None else None
        return context if context is not None else self.initial_context()

    def pick(self, server_name: str | None) -> int | None:
        if server_name is None:
            return self.default_index
        name = server_name.lower().rstrip(".")
        index = self.exact.get(name)
        if index is not None:
            return index
        for suffix, index in self.suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return index
        return self.catch_all

    def _on_server_name(self, server_name: str | None) -> TlsContext | int:
        """During the handshake: the context of the server `server_name` picks, or the alert that
        refuses it (refusal() names why)."""
        index = self.pick(server_name)
        if index is None:
            return ALERT_UNRECOGNIZED_NAME
        chosen = self.servers[index].context
        if chosen is None:
            return ALERT_INTERNAL_ERROR
        return chosen

    def refusal(self, server_name: str | None, version: int | None = None) -> str | None:
        """Why the SNI callback refuses `server_name` with the protocol `version` OpenSSL settled
        (a stats reason), None when it does not (failure_reason says when to pass `version`)."""
        index = self.pick(server_name)
        if index is None:
            return "no_matching_server"
        context = self.servers[index].context
        if context is None:
            return "no_certificate"
        if version is not None and not context.accepts_version(version):
            return "unsupported_protocol"
        return None

    def failure_reason(self, conn, error: Exception) -> str:
        """The stats reason of a handshake of TlsConn `conn` that failed with `error`: why the SNI
        callback refused it when it did (its version only then: before the ClientHello, OpenSSL
        reports its highest), else the TLS layer's reason."""
        cause = error.__cause__
        # OpenSSL's reason for a refusing SNI callback; BoringSSL's
        in_callback = isinstance(cause, OpenSslError) and cause.reason in ("CALLBACK_FAILED", "CLIENTHELLO_TLSEXT")
        return (self.refusal(conn.server_name, conn.protocol_version_number if in_callback else None)
                or getattr(error, "reason", "connection_error"))

    def server_for(self, conn) -> ServerTls:
        """The server a completed handshake of TlsConn `conn` chose (by its SNI; the default one
        without)."""
        index = self.pick(conn.server_name)
        return self.servers[self.default_index if index is None else index].server

    def count_error(self, reason: str) -> None:
        counter = self._errors.get(reason)
        if counter is None:
            counter = self._errors[reason] = self.stats.counter(
                "triomesh_tls_handshake_error_total", listener=self.listener_name, reason=reason)
        counter.value += 1


class TlsListeners:
    """A worker's ListenerTls by listener, kept while a listener's servers are unchanged."""

    def __init__(self, stats: Stats, identity=None, session_tickets: bool = True) -> None:
        self.stats = stats
        self.identity = identity  # the worker's IdentityHolder (ISTIO_MUTUAL servers)
        self.session_tickets = session_tickets  # see ListenerTls
        self._by_listener: dict[str, ListenerTls] = {}
        self._snapshot: Snapshot | None = None
        self._listeners: dict[str, Listener] = {}

    def for_listener(self, snapshot: Snapshot, name: str) -> ListenerTls | None:
        """The runtime of listener `name` in `snapshot` (None if it has no terminating server there),
        its certificates checked for changes."""
        if snapshot is not self._snapshot:
            self._listeners = {l.name: l for l in snapshot.listeners if l.tls_servers}
            self._snapshot = snapshot
        listener = self._listeners.get(name)
        if listener is None:
            return None
        runtime = self._by_listener.get(name)
        if runtime is not None and runtime.tls_servers is not listener.tls_servers:
            # another snapshot: the same servers keep their runtime (asked once per snapshot, not
            # per connection: the tuple of a snapshot is then the runtime's)
            if runtime.tls_servers == listener.tls_servers:
                runtime.tls_servers = listener.tls_servers
            else:
                runtime = None
        if runtime is None:
            runtime = self._by_listener[listener.name] = ListenerTls(listener.name, listener.tls_servers, self.stats,
                                                                   self.identity, self.session_tickets)
        return runtime

    async def watch_certificates(self, holder) -> None:
        """Runs for the worker's life: every second, reload the certificates whose files changed,
        traffic or not (so a bad file shows in the stats before a client meets it). `holder`: the
        worker's SnapshotHolder; listeners of the current snapshot get their runtime here first."""
        while True:
            await trio.sleep(RELOAD_CHECK_PERIOD_S)
            snapshot = holder.current
            fresh = set()
            for listener in snapshot.listeners:
                if listener.tls_servers:
                    known = self._by_listener.get(listener.name)
                    runtime = self.for_listener(snapshot, listener.name)
                    if runtime is not known:
                        fresh.add(listener.name)
            for name, runtime in list(self._by_listener.items()):
                if name not in self._listeners:
                    del self._by_listener[name]  # the listener left the config
                elif name not in fresh:
                    runtime.maybe_reload()
