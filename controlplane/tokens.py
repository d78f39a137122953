"""Bootstrap and admin tokens: what each grants, kept as hashes in the CA directory's `tokens.json`.

Theory of operation. An operator makes a token with `triomesh controlplane token --namespace N
[--service-account S]` (a workload token) or `--admin` (for apply/delete/status). The token itself is
printed once; the file keeps only its SHA-256, so reading the file does not reveal a usable token.
A workload token lets a proxy take any identity in its namespace, or only the named service account.
The control plane re-reads the file when it changes (checked on each use: one stat), so new and
removed tokens apply without a restart; a file that does not parse keeps the last good one.

Sync and pure apart from the file; `authorize` is the decision, with its precise refusal.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from controlplane.ca import write_atomic
from proxy.identity.spiffe import SpiffeId

TOKENS_FILE = "tokens.json"


class Grant(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    sha256: str
    namespace: str = ""  # the namespace a workload token grants ("" for an admin token)
    service_account: str = ""  # "" grants every service account of the namespace
    admin: bool = False  # apply, delete and status
    created: str = ""


class TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[Grant] = []


class TokenError(Exception):
    """tokens.json cannot be read; names the file."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_grants(path: Path) -> dict[str, Grant]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise TokenError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        parsed = msgspec.json.decode(data, type=TokensFile)
    except msgspec.ValidationError as e:
        raise TokenError(f"{path}: {e}") from e
    except msgspec.DecodeError as e:
        raise TokenError(f"{path}: not JSON: {e}") from e
    return {g.sha256: g for g in parsed.tokens}


def create_token(path: Path, *, namespace: str = "", service_account: str = "", admin: bool = False) -> str:
    """Add a token to the file and return it (the only time it is seen in clear)."""
    if not admin:
        SpiffeId.of("cluster.local", namespace, service_account or "default")  # checks the names
    grants = read_grants(path)
    token = secrets.token_urlsafe(32)
    grants[token_digest(token)] = Grant(sha256=token_digest(token), namespace=namespace,
                                        service_account=service_account, admin=admin,
                                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, msgspec.json.format(msgspec.json.encode(TokensFile(list(grants.values()))), indent=2) + b"\n",
                 0o600)
    return token


class TokenBook:
    """The grants of one tokens file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._grants: dict[str, Grant] = {}
        self.last_error = ""

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            self._grants = read_grants(self.path)
            self.last_error = ""
        except TokenError as e:
            self.last_error = str(e)  # keep the last good grants
        self._stamp = stamp

    def lookup(self, token: str) -> Grant | None:
        if not token:
            return None
        self._refresh()
        return self._grants.get(token_digest(token))


@dataclass(frozen=True)
class Authorized:
    identity: SpiffeId
    method: str  # "token" or "certificate"


@dataclass(frozen=True)
class Refused:
    code: str  # UNAUTHENTICATED: who it is is not proven; PERMISSION_DENIED: proven, but not for this
    message: str


def authorize(requested: SpiffeId, *, peer: SpiffeId | None, token: str, grant: Grant | None) -> Authorized | Refused:
    """May a caller take `requested`? A client certificate of the same identity proves it (a renewal);
    else a token granting its namespace (and service account, when the token names one)."""
    if peer is not None and peer == requested:
        return Authorized(requested, "certificate")
    if token:
        if grant is None:
            return Refused("UNAUTHENTICATED", "the bootstrap token is not known to this control plane "
                                              "(revoked, or made for another one)")
        if grant.admin:
            return Refused("PERMISSION_DENIED", "an admin token cannot take a workload identity; "
                                                "use a token made with --namespace")
        if grant.namespace != requested.namespace:
            return Refused("PERMISSION_DENIED", f"the bootstrap token grants namespace {grant.namespace!r}, "
                                                f"not {requested.namespace!r}")
        if grant.service_account and grant.service_account != requested.service_account:
            return Refused("PERMISSION_DENIED", f"the bootstrap token grants service account "
                                                f"{grant.namespace}/{grant.service_account}, not "
                                                f"{requested.namespace}/{requested.service_account}")
        return Authorized(requested, "token")
    if peer is not None:
        return Refused("PERMISSION_DENIED", f"the client certificate is {peer.uri}, not {requested.uri}, "
                                            "and no bootstrap token was given")
    return Refused("UNAUTHENTICATED", f"no bootstrap token and no client certificate: a proxy must prove it may be "
                                      f"{requested.uri} (triomesh controlplane token --namespace "
                                      f"{requested.namespace})")
