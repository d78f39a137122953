"""Where the config comes from: the files under --config, their change fingerprint, and compiling
their bytes into a Snapshot (the same way in the supervisor and in every worker)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from proxy.config.snapshot import Snapshot

CONFIG_SUFFIXES = (".yaml", ".yml")

Sources = list[tuple[str, bytes]]
Fingerprint = tuple[tuple[str, int, int], ...]


def config_files(path: Path) -> list[Path]:
    """A file is itself; a directory is its *.yaml / *.yml files, sorted by name (not recursive).
    Raises FileNotFoundError when the path does not exist."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())
    if path.exists():
        return [path]
    raise FileNotFoundError(f"config path {str(path)!r} does not exist")


def fingerprint(path: Path) -> Fingerprint:
    """(name, mtime_ns, size) of every config file: cheap to poll, changes when a file is written,
    added or removed. A missing path has the empty fingerprint."""
    try:
        files = config_files(path)
    except FileNotFoundError:
        return ()
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:  # removed between listing and stat; the next poll sees it
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_sources(path: Path) -> Sources:
    return [(str(f), f.read_bytes()) for f in config_files(path)]


def content_digest(sources: Sources) -> str:
    h = hashlib.sha256()
    for name, data in sources:
        h.update(name.encode())
        h.update(b"\0")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def build_snapshot(sources: Sources, *, version: str, bind_address: str) -> Snapshot:
    """Load every source and compile them together. Raises proxy.config.errors.ConfigError."""
    # imported here so the CLI starts (and `--help` works) without loading the config machinery
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes

    resources = []
    for name, data in sources:
        resources.extend(load_bytes(data, name))
    return compile_resources(resources, version=version, bind_address=bind_address)
