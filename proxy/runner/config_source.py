"""Where the config comes from: the files under --config, their change fingerprint, and compiling
their bytes into a Snapshot (the same way in the supervisor and in every worker)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from proxy.config.snapshot import Snapshot

Sources = list[tuple[str, bytes]]
Fingerprint = tuple[tuple[str, int, int, int], ...]


def config_files(path: Path) -> list[Path]:
    """The loader's rule (a file, or a directory's sorted *.yaml/*.yml); ConfigError when missing."""
    from proxy.config.load import config_files as loader_config_files

    return loader_config_files(path)


def fingerprint(path: Path) -> Fingerprint:
    """(name, inode, mtime_ns, size) of every config file (symlinks followed): cheap to poll, changes
    when a file is written, added, removed or renamed over (a `..data` symlink swap gives a new
    inode). A missing path has the empty fingerprint."""
    from proxy.config.errors import ConfigError

    try:
        files = config_files(path)
    except ConfigError:
        return ()
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:  # removed between listing and stat; the next poll sees it
            continue
        out.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_sources(path: Path) -> Sources:
    """(file name, bytes) of every config file. Raises ConfigError (missing path, unreadable file)."""
    from proxy.config.errors import ConfigError

    out = []
    for f in config_files(path):
        try:
            out.append((str(f), f.read_bytes()))
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", file=str(f)) from None
    return out


def content_digest(sources: Sources) -> str:
    h = hashlib.sha256()
    for name, data in sources:
        h.update(name.encode())
        h.update(b"\0")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def build_snapshot(sources: Sources, *, version: str, bind_address: str,
                   proxy_labels: Mapping[str, str] | None = None, proxy_namespace: str | None = None,
                   credentials_dir: str | None = None) -> Snapshot:
    """Load every source and compile them together (the same steps as load_path + compile, on bytes
    already read). `proxy_labels`: this proxy's workload labels (Gateway selectors, sourceLabels);
    None applies every Gateway. `proxy_namespace`: the workload's namespace (which DestinationRule and
    which of several same-named short hosts apply); None for a standalone edge. `credentials_dir`:
    where Gateway credentialNames resolve. Raises
    proxy.config.errors.ConfigError."""
    # imported here so the CLI starts (and `--help` works) without loading the config machinery
    from proxy.config.compile import compile_resources
    from proxy.config.load import load_bytes

    resources = []
    for name, data in sources:
        resources.extend(load_bytes(data, name))
    return compile_resources(resources, version=version, bind_address=bind_address, proxy_labels=proxy_labels,
                             proxy_namespace=proxy_namespace, credentials_dir=credentials_dir)
