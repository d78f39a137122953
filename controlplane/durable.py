"""The control plane's local store: the applied layer, registered workloads and the config version,
kept in one file under the data directory and replaced atomically.

Theory of operation. The whole durable state is one MessagePack document (`controlplane-state.msgpack`).
A commit writes the new document to a temporary file in the same directory, fsyncs it, renames it over
the old one and fsyncs the directory. rename(2) replaces the name atomically, so a reader (the next
start) finds either the old document or the new one, never a mix: a crash before the rename leaves the
old state (and a stray temporary file, removed at the next start), a crash after it the new one; the
directory fsync makes the rename itself survive a power loss before the change is acknowledged.
Rewriting everything is simple and costs O(state) per change; changes are human-paced `apply`s and
proxy registrations, and an unchanged re-registration (a reconnect) writes nothing.

A lock (flock on `controlplane.lock`) keeps a second control plane from sharing the directory: two
writers would each overwrite the other's changes.

Sync, plain file IO: the server calls it between validation and acknowledgement.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import msgspec

STATE_FILE = "controlplane-state.msgpack"
LOCK_FILE = "controlplane.lock"
FORMAT_VERSION = 1


class StoreError(Exception):
    """The data directory cannot be used (locked, unreadable, a corrupt state file)."""


class PersistedResource(msgspec.Struct, array_like=True):
    """One resource as the wire carries it: its MessagePack body and where it was defined."""

    body: bytes
    file: str
    document: int


class PersistedState(msgspec.Struct, kw_only=True):
    format_version: int = FORMAT_VERSION
    generation: int = 0  # the control plane's config version (`ConfigStore.version`)
    content_version: str = ""  # a hash of the merged state the generation stands for
    applied: list[PersistedResource] = []
    workloads: list[PersistedResource] = []
    shared_revision: int = 0  # replicated on etcd: the applied layer's revision (`ConfigStore.version`)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PersistedState)


def encode_state(state: PersistedState) -> bytes:
    return _encoder.encode(state)


def decode_state(data: bytes) -> PersistedState:
    """Raises StoreError for bytes that are not a state document of this format."""
    try:
        state = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StoreError(f"not a control-plane state document: {e}") from e
    if state.format_version != FORMAT_VERSION:
        raise StoreError(f"format version {state.format_version} is not supported (this control plane reads "
                         f"{FORMAT_VERSION})")
    return state


class DataDirectory:
    """The control plane's data directory, locked for this process while it is open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state_path = path / STATE_FILE
        self._lock_fd: int | None = None

    def open(self) -> "DataDirectory":
        """Create the directory if needed, take its lock and clear leftovers of an interrupted write.
        Raises StoreError."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"data directory {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise StoreError(f"data directory {self.path} is in use by another control plane"
                             + (f" (pid {holder})" if holder else "")) from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for leftover in self.path.glob(f".{STATE_FILE}.*.tmp"):
            leftover.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def load(self) -> PersistedState | None:
        """The last committed state, or None for a new directory. Raises StoreError."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{self.state_path}: {e.strerror}") from e
        try:
            return decode_state(data)
        except StoreError as e:
            raise StoreError(f"{self.state_path}: {e}") from e

    def commit(self, state: PersistedState) -> None:
        """Replace the stored state atomically and durably. Raises OSError (the old state stays)."""
        data = encode_state(state)
        tmp = self.path / f".{STATE_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.state_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
