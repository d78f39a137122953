"""The proxy's current workload identity and its renewal over the control-plane stream.

Theory of operation. `current` is one immutable `WorkloadIdentity`, replaced whole (one reference
rebinds; readers keep the object they took). While a control-plane stream is up and its Welcome says
the control plane issues certificates, `run_on_stream` keeps the identity fresh: at once when there
is none (or it is for another SPIFFE ID, or expired), else at about half of its lifetime
(proxy/identity/renewal.py). Each attempt makes a new key locally, sends only the CSR, and waits for
the reply, which the stream's receive loop hands over with `deliver`. A refused, malformed or late
reply is retried with back-off; the current certificate keeps serving meanwhile. When the stream
ends, renewal waits for the next one (whose TLS handshake shows the current certificate, so a proxy
whose bootstrap token was withdrawn can still renew while its certificate is valid). A TrustBundle
from the control plane (root rotation) replaces the bundle of the current identity.

`on_change` is called with each new identity (the supervisor hands it to its workers).
"""

from __future__ import annotations

import inspect
import itertools
import random
import time
from typing import Any, Awaitable, Callable

import trio
from proxy.identity.renewal import renew_at, retry_delay
from proxy.identity.spiffe import InvalidSpiffeId, SpiffeId
from proxy.identity.workload import IdentityError, WorkloadIdentity

REPLY_TIMEOUT_S = 10.0

OnChange = Callable[[WorkloadIdentity], "None | Awaitable[None]"]
SendRequest = Callable[[int, bytes], Awaitable[None]]  # (request_id, csr_pem)


class CertificateFailed(Exception):
    """An attempt to get a certificate did not give a usable one; says why."""


class IdentityManager:
    def __init__(self, on_change: OnChange | None = None, *, log: Any = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.current: WorkloadIdentity | None = None
        self.on_change = on_change
        self.log = log
        self.rng = rng or random.Random()
        self.clock = clock
        self.issued = 0  # certificates received (the first and every renewal)
        self.failures = 0
        self.last_error = ""
        self.next_renewal_at: float | None = None
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list]] = {}

    def usable_now(self) -> WorkloadIdentity | None:
        """The current identity while its certificate is valid (to show as a TLS client certificate)."""
        identity = self.current
        return identity if identity is not None and identity.valid_at(self.clock()) else None

    # ---- messages from the stream

    def deliver(self, request_id: int, reply: Any) -> None:
        waiter = self._waiting.pop(request_id, None)
        if waiter is not None:
            waiter[1].append(reply)
            waiter[0].set()

    async def update_trust_bundle(self, trust_bundle_pem: bytes) -> None:
        identity = self.current
        if identity is None or identity.trust_bundle_pem == trust_bundle_pem:
            return
        try:
            updated = identity.with_trust_bundle(trust_bundle_pem)
        except IdentityError as e:  # keep the bundle that works; the next renewal brings a consistent pair
            self.last_error = f"trust bundle from the control plane refused: {e}"
            if self.log is not None:
                self.log.warning("trust_bundle_refused", error=str(e), serving_serial=identity.serial)
            return
        await self._swap(updated, "trust_bundle_changed")

    # ---- renewal

    def _due_at(self, wanted: str) -> float:
        identity = self.current
        now = self.clock()
        if identity is None or identity.spiffe_id != wanted or not identity.valid_at(now):
            return now
        return renew_at(identity.received_at or identity.not_before, identity.not_after, self.rng)

    async def run_on_stream(self, identity_uri: str, send_request: SendRequest) -> None:
        """Keep the identity fresh while this stream lasts (cancelled when it ends)."""
        try:
            wanted = SpiffeId.parse(identity_uri)
        except InvalidSpiffeId as e:
            self.last_error = f"the control plane named an invalid identity: {e}"
            return
        attempt = 0
        while True:
            due = self._due_at(wanted.uri)
            self.next_renewal_at = due
            await trio.sleep(max(0.0, due - self.clock()))
            try:
                await self._renew_once(wanted, send_request)
                attempt = 0
            except CertificateFailed as e:
                self.failures += 1
                self.last_error = str(e)
                current = self.current
                delay = retry_delay(attempt, not_after=current.not_after if current else None, now=self.clock(),
                                    rng=self.rng)
                attempt += 1
                if self.log is not None:
                    self.log.warning("certificate_renewal_failed", error=str(e), retry_in_s=round(delay, 3),
                                     serving_serial=current.serial if current else None)
                self.next_renewal_at = self.clock() + delay
                await trio.sleep(delay)

    async def _renew_once(self, wanted: SpiffeId, send_request: SendRequest) -> None:
        from proxy.identity.csr import new_key_and_request  # cryptography: only in proxies that get certificates

        keys = new_key_and_request(wanted)
        request_id = next(self._request_ids)
        event, box = trio.Event(), []
        self._waiting[request_id] = (event, box)
        try:
            await send_request(request_id, keys.csr_pem)
            with trio.move_on_after(REPLY_TIMEOUT_S):
                await event.wait()
        finally:
            self._waiting.pop(request_id, None)
        if not box:
            raise CertificateFailed(f"no reply to certificate request {request_id} within {REPLY_TIMEOUT_S}s")
        reply = box[0]
        if reply.error_code:
            raise CertificateFailed(f"{reply.error_code}: {reply.error}")
        try:
            identity = WorkloadIdentity.from_pem(reply.certificate_chain, keys.private_key_pem, reply.trust_bundle,
                                                 received_at=self.clock())
            _check_key_matches(identity)
        except IdentityError as e:
            raise CertificateFailed(f"unusable certificate from the control plane: {e}") from e
        if identity.spiffe_id != wanted.uri:
            raise CertificateFailed(f"the control plane issued {identity.spiffe_id}, not {wanted.uri}")
        self.issued += 1
        self.last_error = ""
        await self._swap(identity, "renewed" if self.current is not None else "issued")

    async def _swap(self, identity: WorkloadIdentity, reason: str) -> None:
        self.current = identity
        if self.log is not None:
            self.log.info("workload_identity_" + reason, spiffe_id=identity.spiffe_id, serial=identity.serial,
                          not_after=identity.dump()["not_after"])
        if self.on_change is not None:
            result = self.on_change(identity)
            if inspect.isawaitable(result):
                await result

    def dump(self) -> dict:
        identity = self.current
        out = identity.dump() if identity is not None else {"spiffe_id": ""}
        out.update(certificates_issued=self.issued, failures=self.failures, last_error=self.last_error,
                   next_renewal=(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.next_renewal_at))
                                 if self.next_renewal_at is not None else ""))
        return out


def _check_key_matches(identity: WorkloadIdentity) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(identity.certificate_chain_pem)[0]
    key = serialization.load_pem_private_key(identity.private_key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise IdentityError("the certificate is not for the key this proxy made")
