"""The TLS sessions a client context keeps for resumption: the newest per server it spoke with.

A new upstream connection to a server of a kept session offers that session's ticket (TLS 1.3
resumption with a fresh key exchange, `psk_dhe_ke`): neither side sends, signs or verifies a
certificate, about half a full mutual TLS handshake's CPU on each side (docs/tls.md). Envoy's
upstream TLS resumes by default too (`max_session_keys` 1), so an Istio client sidecar resumes with
a server sidecar, and so does ours. One difference: Envoy offers a TLS 1.3 session once and drops
it, as RFC 8446 (appendix C.4) advises against a ticket linking connections for a passive observer;
here the newest session is offered to every new connection until a newer ticket replaces it, so
that a burst of new connections resumes too. Within a mesh the observer already sees both pods'
addresses.

Why a resumed connection is as trustworthy as the full handshake that made its session:
- a session is kept only from a connection that passed every check of its full handshake or its
  own resumption (chain, host name, subjectAltNames, the mesh's SPIFFE ID): the caller marks it
  (`TlsConn.session_key`) after those checks;
- it is offered only to the same server: the key is the endpoint and the SNI (the name the chain
  was checked against), within one client context (one trust, one client certificate, one ALPN
  list). A renewed workload certificate or new trust files make a new context, so sessions made
  with the old ones are never offered again;
- the session carries the server's certificate, so checks made after a handshake (subjectAltNames,
  the SPIFFE ID) read the same certificate on a resumed connection as on the full one;
- the server decides: a ticket it cannot decrypt (another process, a new certificate: a new
  context, new ticket keys) or that expired (OpenSSL offers no ticket past its lifetime) makes a
  full handshake, never a failure.

What resumption does not recheck, as in Envoy: the certificates' expiry. A session lives for the
server's ticket lifetime (OpenSSL's default, 2 h, Envoy's `session_timeout` default too), so a
peer whose certificate expired within that time (its renewal failed) resumes with its principal
until then; workload certificates are renewed well before they expire.

Servers of several worker processes: each worker has its own ticket keys, so a ticket resumes only
on the worker that issued it (session_tickets_pay_off below).

TLS 1.3 tickets arrive after the handshake, ahead of the server's first application data (ours send
them with the first response, BoringSSL's right after the handshake), so a session is taken when
the connection first reads plaintext, the tickets read by then; a resumed connection gets a new
ticket and replaces the session it used. Sessions are kept per context up to SESSIONS_PER_CONTEXT
servers, the oldest dropped first (a session holds the server's decoded certificate: a few KB).
"""

from __future__ import annotations

SESSIONS_PER_CONTEXT = 256
# Each worker process makes its own server contexts, so its own ticket keys (the binding cannot set
# them), and the kernel spreads a client's connections over the workers: a ticket resumes on the
# worker that issued it, about one new connection in N. A server's new mesh connection costs 5.84M
# instructions as a full handshake with its two tickets, 3.21M resumed, 5.15M as a full handshake
# without tickets (docs/tls.md, "Session resumption between sidecars"): the tickets repay the server
# up to about 4 workers, so the servers of a proxy of more send none
MAX_WORKERS_FOR_SESSION_TICKETS = 4


def session_tickets_pay_off(workers: int) -> bool:
    """Whether the servers (mesh and Gateway) of a proxy with `workers` worker processes send
    resumable session tickets."""
    return workers <= MAX_WORKERS_FOR_SESSION_TICKETS


class ClientSessions:
    """Per client context: server key -> the newest session (an owned SSL_SESSION, freed when
    dropped). Keys are whatever tells servers apart for the caller: (endpoint, SNI) upstream."""

    __slots__ = ("_library", "_sessions", "limit")

    def __init__(self, library, limit: int = SESSIONS_PER_CONTEXT) -> None:
        self._library = library
        self._sessions: dict = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key):
        """The session to offer to the server of `key` (a cdata SSL_SESSION *), or None."""
        return self._sessions.get(key)

    def keep(self, key, ssl) -> None:
        """Keep the current session of the connection `ssl` (checked, see the module) for `key`."""
        library = self._library
        lib, ffi = library.lib, library.ffi
        # BoringSSL: the newest ticket's session, kept by our callback (native/boringssl_binding.py)
        pointer = lib.tm_take_new_session(ssl) if library.boringssl else lib.SSL_get1_session(ssl)
        if pointer == ffi.NULL:
            return
        sessions = self._sessions
        sessions.pop(key, None)  # newest last: the first is the one to drop
        sessions[key] = ffi.gc(pointer, lib.SSL_SESSION_free)
        if len(sessions) > self.limit:
            del sessions[next(iter(sessions))]
