"""Rotating the self-signed root this control plane made, in three steps the operator runs one after
another (the order of Istio's plug-in CA rotation):

1. `add_new_root` (`triomesh controlplane ca rotate`): a new root and its key are prepared beside the
   current signer and the new root joins `root-cert.pem`. The old signer keeps signing, so every
   certificate, the control plane's own included, still verifies with the roots proxies already
   hold, and a proxy that is away meanwhile gets back in; proxies receive the two-root bundle.
2. `switch_signer` (`ca switch-signer`), once every proxy has the new root: the new root signs.
   While both roots are trusted, certificates from either verify everywhere.
3. `drop_old_roots` (`ca drop-old-roots`), once every proxy renewed: only the signer's root stays in
   `root-cert.pem`, and the old keys are deleted.

Crash safety: each step commits with one atomic rename, so the directory loads as the CA before the
step or the CA after it, wherever a step stops; a stopped step is run again. To make switching the
signer's three files one rename, they are symlinks into `signer`, itself a symlink to a directory
`signer-<serial>/` holding one signer's `ca-cert.pem`, `ca-key.pem` and `cert-chain.pem`: the switch
re-points `signer`. Step 1 points `next-signer` at the signer it prepares, which waits for step 2
once its root is in `root-cert.pem`. A directory in the plain layout (as first written) moves to this one in step 1,
one file at a time, each replaced by a link to an identical copy.

Only a root this control plane made is rotated: an operator's plug-in CA is used as given and never
rewritten; the operator rotates it by replacing its files (docs/identity.md).
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.ca import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    ROOT_CERT,
    CaError,
    CertificateAuthority,
    certificates_pem,
    is_generated_root,
    new_root,
    private_key_pem,
    public_key_der,
    write_atomic,
)

SIGNER_LINK = "signer"
NEXT_SIGNER_LINK = "next-signer"  # the signer step 1 prepared, until step 2 makes it `signer`
SIGNER_DIR_PREFIX = "signer-"
SIGNER_FILES = (CA_CERT, CA_KEY, CERT_CHAIN)


def add_new_root(directory: Path, trust_domain: str, *, now: datetime.datetime | None = None) -> x509.Certificate:
    """Step 1: a new root, trusted from now on next to the current ones; the current signer goes on
    signing. Returns the new root. Raises CaError."""
    directory = Path(directory)
    current = _rotatable(directory, trust_domain, now)
    waiting = _waiting_signer(directory, current)
    if waiting is not None:
        raise CaError(f"{directory}: the new root {waiting[1].subject.rfc4514_string()} is already in {ROOT_CERT} "
                      f"and waits to sign: run `triomesh controlplane ca switch-signer` next")
    _move_to_signer_link(directory, current)
    _remove_unused_signers(directory, current)
    certificate, key = new_root(trust_domain, now=now)
    path = _publish_signer(directory, certificate.serial_number, {CA_CERT: certificates_pem([certificate]),
                                                                  CA_KEY: private_key_pem(key),
                                                                  CERT_CHAIN: certificates_pem([certificate])})
    _replace_symlink(directory / NEXT_SIGNER_LINK, path.name)  # it waits to sign once its root is trusted
    write_atomic(directory / ROOT_CERT, certificates_pem([*current.roots, certificate]))  # the commit
    _sync_directory(directory)
    return certificate


def switch_signer(directory: Path, trust_domain: str, *, now: datetime.datetime | None = None) -> x509.Certificate:
    """Step 2: the root step 1 added signs from now on. Returns it. Raises CaError."""
    directory = Path(directory)
    current = _rotatable(directory, trust_domain, now)
    waiting = _waiting_signer(directory, current)
    if waiting is None:
        raise CaError(f"{directory}: no new root waits to sign; `triomesh controlplane ca rotate` adds one to "
                      f"{ROOT_CERT} first")
    path, certificate = waiting
    _check_signer(path, certificate)
    _replace_symlink(directory / SIGNER_LINK, path.name)  # the commit
    (directory / NEXT_SIGNER_LINK).unlink()  # left behind it would point at the signer: not waiting
    _sync_directory(directory)
    return certificate


def drop_old_roots(directory: Path, trust_domain: str, *, now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """Step 3: trust only the signer's root; delete the keys of the others. Returns the roots dropped
    (none when there were none). Raises CaError."""
    directory = Path(directory)
    current = _rotatable(directory, trust_domain, now)
    waiting = _waiting_signer(directory, current)
    if waiting is not None:
        raise CaError(f"{directory}: the new root {waiting[1].subject.rfc4514_string()} does not sign yet; "
                      f"dropping the others now would leave no trusted root for the signer: run "
                      f"`triomesh controlplane ca switch-signer` first")
    dropped = [root for root in current.roots if root != current.signing_certificate]
    if dropped:
        write_atomic(directory / ROOT_CERT, certificates_pem([current.signing_certificate]))  # the commit
        _sync_directory(directory)
    _remove_unused_signers(directory, CertificateAuthority.load(directory, trust_domain, now=now))
    return dropped


def waiting_root(directory: Path, ca: CertificateAuthority) -> x509.Certificate | None:
    """The root step 1 added that does not sign yet (for `ca show`), if any."""
    waiting = _waiting_signer(Path(directory), ca)
    return waiting[1] if waiting is not None else None


# ---- helpers


def _rotatable(directory: Path, trust_domain: str, now: datetime.datetime | None) -> CertificateAuthority:
    current = CertificateAuthority.load(directory, trust_domain, now=now)
    if not is_generated_root(current.signing_certificate):
        raise CaError(f"{directory}: a plug-in CA is used as given and never rewritten ({CA_CERT} is "
                      f"{current.signing_certificate.subject.rfc4514_string()}, issued by "
                      f"{current.signing_certificate.issuer.rfc4514_string()}); rotate it by replacing its files "
                      f"(add the new root to {ROOT_CERT} first, then switch {CA_CERT}, {CA_KEY} and {CERT_CHAIN}); "
                      f"`ca rotate` rotates only the self-signed root this control plane made")
    return current


def _signer_dirs(directory: Path) -> list[tuple[Path, x509.Certificate | None]]:
    """Every `signer-<serial>/` with its certificate (None: unreadable, a step stopped half way)."""
    out = []
    for path in sorted(directory.glob(f"{SIGNER_DIR_PREFIX}*")):
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            out.append((path, x509.load_pem_x509_certificate((path / CA_CERT).read_bytes())))
        except (OSError, ValueError):
            out.append((path, None))
    return out


def _waiting_signer(directory: Path, ca: CertificateAuthority) -> tuple[Path, x509.Certificate] | None:
    """What step 1 leaves for step 2: the prepared signer, once its root is trusted and until it signs."""
    link = directory / NEXT_SIGNER_LINK
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    for path, certificate in _signer_dirs(directory):
        if path.name == target and certificate is not None:
            trusted = certificate in ca.roots and certificate != ca.signing_certificate
            return (path, certificate) if trusted else None
    return None


def _remove_unused_signers(directory: Path, ca: CertificateAuthority) -> None:
    """Signer directories neither signing nor trusted: left by a step that stopped, or by step 3."""
    link = directory / SIGNER_LINK
    in_use = {os.readlink(link)} if link.is_symlink() else set()
    waiting = _waiting_signer(directory, ca)
    if waiting is not None:
        in_use.add(waiting[0].name)
    for path, certificate in _signer_dirs(directory):
        if path.name not in in_use and (certificate is None or certificate not in ca.roots):
            shutil.rmtree(path)


def _move_to_signer_link(directory: Path, ca: CertificateAuthority) -> None:
    """The plain layout to the linked one. Each change swaps a file for a link to the same bytes, so
    the directory loads as the same CA throughout; a half-done move is completed."""
    link = directory / SIGNER_LINK
    if not link.is_symlink():
        path = _publish_signer(directory, ca.signing_certificate.serial_number,
                               {name: (directory / name).read_bytes() for name in SIGNER_FILES})
        _replace_symlink(link, path.name)
    for name in SIGNER_FILES:
        if not (directory / name).is_symlink():
            _replace_symlink(directory / name, f"{SIGNER_LINK}/{name}")
    _sync_directory(directory)


def _publish_signer(directory: Path, serial: int, files: dict[str, bytes]) -> Path:
    """`signer-<serial>/` with these files, appearing whole (written aside, then renamed)."""
    final = directory / f"{SIGNER_DIR_PREFIX}{serial:x}"
    tmp = directory / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    for name, data in files.items():
        write_atomic(tmp / name, data, 0o600 if name == CA_KEY else 0o644)
    if final.exists():  # the same one from a step that stopped: no link points at it yet
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _check_signer(path: Path, certificate: x509.Certificate) -> None:
    """The prepared signer is usable (its key is there and matches), before anything points at it."""
    try:
        key = serialization.load_pem_private_key((path / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CaError(f"{path / CA_KEY}: the prepared key cannot be read: {e}") from e
    if public_key_der(key.public_key()) != public_key_der(certificate.public_key()):
        raise CaError(f"{path / CA_KEY}: the prepared key does not match {path / CA_CERT}")


def _replace_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, path)  # rename(2) replaces the link (or file) itself, atomically


def _sync_directory(directory: Path) -> None:
    """Renames are durable once the directory is synced (a power loss could otherwise undo them)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
