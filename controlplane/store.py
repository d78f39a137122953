"""The control plane's config store: the last valid state, and the only way to change it.

Theory of operation. The state is three layers of resources keyed by (kind, namespace, name):
1. `files`: what the watched directory holds (replaced wholesale when its files change);
2. `applied`: what `triomesh apply` sent (kubectl-style: create or replace by key; it overrides a
   file-defined resource of the same key, and `delete` of it brings the file's version back);
3. `workloads`: WorkloadEntries registered by connected proxies (WorkloadGroup-style auto-registration).
Every change builds the whole new merged state and validates it before anything is replaced: each
resource has already passed the loader's checks, then the state is compiled (compile_resources) as
seen by every proxy class that matters (representative classes from the config's own selectors plus
the classes of connected proxies, each through its per-proxy view). A failure raises the ConfigError
that names file, document, kind/name and field path, and the store keeps its state untouched.

With a data directory (controlplane/durable.py), an accepted change to the applied or workloads layer
(or to the version) is written there before it replaces the state in memory, so a change is durable
before it is acknowledged; a failed write refuses the change like an invalid one. `restore` brings a
stored state back at start: the version stays the stored one while the merged content is the same.
With a shared store (etcd, controlplane/etcd.py), a change to the applied layer is first written there
by compare-and-swap; a replica that lost the race takes the other's layer and redoes its change.

Sync; its IO is the watched directory's files, the data directory and the shared store (short
timeouts); the server calls it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from controlplane.durable import DataDirectory, PersistedResource, PersistedState
from controlplane.etcd import EtcdAppliedStore, EtcdUnavailable, SharedApplied
from controlplane.snapshots import ProxyClass, StoredResource, ViewCache, representative_classes, view_version
from controlplane.wire import ResourceKey, decode_istio
from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.istio import ObjectMeta, WorkloadEntry, WorkloadEntrySpec
from proxy.config.load import Resource, check_duplicates, load_bytes

Fingerprint = tuple[tuple[str, int, int], ...]
Layer = dict[ResourceKey, StoredResource]


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())


def directory_fingerprint(directory: Path) -> Fingerprint:
    """(name, mtime_ns, size) per YAML file: cheap to poll; changes on write, add and remove."""
    try:
        files = _yaml_files(directory)
    except OSError:
        return ()
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _class_order(pc: ProxyClass) -> tuple:
    return (pc.namespace, sorted(pc.labels))


def _describe(key: ResourceKey) -> str:
    return f"{key.kind} {key.namespace}/{key.name}"


def load_sources(sources: Iterable[tuple[str, bytes]]) -> list[Resource]:
    resources: list[Resource] = []
    for name, data in sources:
        resources.extend(load_bytes(data, name))
    check_duplicates(resources)
    return resources


def content_version(state: Mapping[ResourceKey, StoredResource]) -> str:
    """A hash of the merged state: equal for equal content, whatever the order of changes."""
    return view_version(state[k] for k in sorted(state, key=lambda k: (k.kind, k.namespace, k.name)))


def _differs(old: Mapping[ResourceKey, StoredResource], new: Mapping[ResourceKey, StoredResource]) -> bool:
    return old.keys() != new.keys() or any(old[k].digest != s.digest for k, s in new.items())


def _persisted(layer: Layer) -> list[PersistedResource]:
    return [PersistedResource(s.body, s.resource.file, s.resource.document) for s in layer.values()]


def _layer(stored: list[PersistedResource]) -> Layer:
    resources = (StoredResource.of(decode_istio(r.body, file=r.file, document=r.document)) for r in stored)
    return {s.key: s for s in resources}


class SharedConflict(Exception):
    """Another replica changed the shared applied layer since this store read it."""


class ChangeOutcome:
    """What one accepted change did, per key, kubectl's words."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.configured: list[str] = []
        self.unchanged: list[str] = []
        self.deleted: list[str] = []

    @property
    def changed(self) -> bool:
        return bool(self.created or self.configured or self.deleted)


class ConfigStore:
    def __init__(
        self,
        config_dir: Path | None = None,
        *,
        extra_classes: Callable[[], Iterable[ProxyClass]] = lambda: (),
        bind_address: str = "0.0.0.0",
        data: DataDirectory | None = None,
        shared: EtcdAppliedStore | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.data = data
        self.shared = shared  # the applied layer shared by replicas (etcd); the data directory caches it
        self.shared_revision = 0  # the shared layer's revision this store holds
        self._restored: PersistedState | None = None  # until the first commit after a restore
        self.extra_classes = extra_classes  # the classes of connected proxies (from the server)
        self.bind_address = bind_address
        self.files: Layer = {}
        self.applied: Layer = {}
        self.workloads: Layer = {}
        self.state: dict[ResourceKey, StoredResource] = {}
        self.generation = 0  # bumped by every accepted change: the control plane's config version
        self.fingerprint: Fingerprint = ()
        self.last_error: str = ""

    @property
    def version(self) -> str:
        return str(self.generation)

    # ---- validation and commit

    @staticmethod
    def merge(files: Layer, applied: Layer, workloads: Layer) -> dict[ResourceKey, StoredResource]:
        state = dict(files)
        state.update(applied)
        for k, s in workloads.items():
            state.setdefault(k, s)  # configured WorkloadEntries win over registered ones
        return state

    def _compile(self, cache: ViewCache, pc: ProxyClass) -> None:
        try:
            compile_resources(
                [s.resource for s in cache.view(pc).resources],
                version="validate",
                bind_address=self.bind_address,
                proxy_labels=pc.label_dict,
                read_certificates=False,  # certificate files live on the proxies, which check them
            )
        except ConfigError as e:
            if not pc.labels:
                raise
            labels = ",".join(f"{k}={v}" for k, v in sorted(pc.labels))
            raise ConfigError(f"{e.message} (in the config of proxies in namespace {pc.namespace} with labels {labels})",
                              file=e.file, document=e.document, kind=e.kind, name=e.name,
                              field_path=e.field_path) from None

    def validate(self, state: Mapping[ResourceKey, StoredResource]) -> None:
        """Compile the state as every relevant proxy class sees it. Raises ConfigError.

        The representative classes must all compile. A connected proxy's class must keep compiling
        if it compiles now: a proxy that already NACKs the current state (its own labels select
        conflicting config) does not block changes for everyone else."""
        cache = ViewCache(state)
        keys = cache.keys  # labels outside these cannot change a view or how it compiles

        def narrow(pc: ProxyClass) -> ProxyClass:
            return ProxyClass(pc.namespace, frozenset(kv for kv in pc.labels if kv[0] in keys))

        compiled: set[tuple[str, frozenset]] = set()

        def first_time(pc: ProxyClass) -> bool:
            effective = (cache.view(pc).version, pc.labels)  # the same view with the same labels compiles alike
            if effective in compiled:
                return False
            compiled.add(effective)
            return True

        representative = {narrow(pc) for pc in representative_classes(state)}
        for pc in sorted(representative, key=_class_order):
            if first_time(pc):
                self._compile(cache, pc)
        connected: dict[ProxyClass, ProxyClass] = {}  # narrowed -> one full class (thousands of proxies, few classes)
        for pc in self.extra_classes():
            connected.setdefault(narrow(pc), pc)
        current = None
        for pc in sorted(connected.keys() - representative, key=_class_order):
            if not first_time(pc):
                continue
            try:
                self._compile(cache, pc)
            except ConfigError:
                current = current or ViewCache(self.state)
                try:
                    self._compile(current, connected[pc])
                except ConfigError:
                    continue  # broken before this change too: not this change's doing
                raise

    def _commit(self, files: Layer, applied: Layer, workloads: Layer, *, shared_revision: int | None = None) -> bool:
        """`shared_revision`: the applied layer comes from the shared store at that revision (no write)."""
        state = self.merge(files, applied, workloads)
        self.validate(state)
        changed = _differs(self.state, state)
        if self.shared is not None and shared_revision is None and _differs(self.applied, applied):
            shared_revision = self._write_shared(applied)
        generation = self.generation + 1 if changed else self.generation
        if self._restored is not None:  # the first commit after a restart: the directory's files are back
            same = self._restored.content_version == content_version(state)
            generation = self._restored.generation if same else self._restored.generation + 1
        if self.data is not None and (generation != self.generation or _differs(self.applied, applied)
                                      or _differs(self.workloads, workloads) or self._restored is not None):
            self._persist(generation, state, applied, workloads)
        self._restored = None
        if shared_revision is not None:
            self.shared_revision = shared_revision
        self.files, self.applied, self.workloads = files, applied, workloads
        self.state = state
        self.generation = generation
        return changed

    def _persist(self, generation: int, state: Mapping[ResourceKey, StoredResource], applied: Layer,
                 workloads: Layer) -> None:
        assert self.data is not None
        try:
            self.data.commit(PersistedState(generation=generation, content_version=content_version(state),
                                            applied=_persisted(applied), workloads=_persisted(workloads)))
        except OSError as e:
            raise ConfigError(f"cannot store the change: {e.strerror or e}; nothing was changed",
                              file=str(self.data.state_path)) from e

    def _write_shared(self, applied: Layer) -> int:
        assert self.shared is not None
        try:
            revision = self.shared.write(PersistedState(applied=_persisted(applied)), self.shared_revision)
        except EtcdUnavailable as e:
            raise ConfigError(f"cannot store the change: {e}; nothing was changed (the control plane keeps "
                              "serving its last state; apply again when the store is back)", file=str(self.shared)) from e
        if revision is None:
            raise SharedConflict()
        return revision

    def take_shared(self, shared: SharedApplied) -> bool:
        """Adopt the applied layer another replica stored. True when the state changed. Raises
        ConfigError (the layer does not validate with this replica's files; state kept)."""
        applied = _layer(shared.state.applied) if shared.state is not None else {}
        return self._commit(self.files, applied, self.workloads, shared_revision=shared.revision)

    def _serialised(self, change: Callable[[], "ChangeOutcome"]) -> "ChangeOutcome":
        """Run an apply/delete; when another replica stored a change first, take it and run it again
        on top (compare-and-swap), so concurrent changes are serialised, never lost."""
        for _ in range(8):
            try:
                return change()
            except SharedConflict:
                assert self.shared is not None
                try:
                    self.take_shared(self.shared.read())
                except EtcdUnavailable as e:
                    raise ConfigError(f"cannot store the change: {e}; nothing was changed",
                                      file=str(self.shared)) from e
        raise ConfigError("cannot store the change: the shared store kept changing under it; nothing was changed",
                          file=str(self.shared))

    # ---- a restart

    def restore(self) -> None:
        """Load the data directory's state (applied and workloads layers, version). Raises StoreError,
        or ConfigError for a stored resource the loader refuses now."""
        if self.data is None:
            return
        stored = self.data.load()
        if stored is None:
            return
        self.applied = _layer(stored.applied)
        self.workloads = _layer(stored.workloads)
        self.state = self.merge(self.files, self.applied, self.workloads)
        self.generation = stored.generation
        self._restored = stored

    # ---- the watched directory

    def load_directory(self) -> bool:
        """Re-read the watched directory. True when the state changed. Raises ConfigError (state kept)."""
        if self.config_dir is None:
            return False
        self.fingerprint = directory_fingerprint(self.config_dir)  # before reading: a later write shows
        if not self.config_dir.is_dir():
            raise ConfigError("not a directory", file=str(self.config_dir))
        sources = []
        for f in _yaml_files(self.config_dir):
            try:
                sources.append((str(f), f.read_bytes()))
            except OSError as e:
                raise ConfigError(f"cannot read: {e.strerror}", file=str(f)) from None
        files = {s.key: s for s in map(StoredResource.of, load_sources(sources))}
        return self._commit(files, self.applied, self.workloads)

    def directory_changed(self) -> bool:
        return self.config_dir is not None and directory_fingerprint(self.config_dir) != self.fingerprint

    # ---- apply / delete

    def apply(self, sources: list[tuple[str, bytes]]) -> ChangeOutcome:
        resources = [StoredResource.of(r) for r in load_sources(sources)]
        return self._serialised(lambda: self._apply(resources))

    def _apply(self, resources: list[StoredResource]) -> ChangeOutcome:
        out = ChangeOutcome()
        applied = dict(self.applied)
        for s in resources:
            old = self.state.get(s.key)
            if old is None:
                out.created.append(_describe(s.key))
            elif old.digest == s.digest:
                out.unchanged.append(_describe(s.key))
            else:
                out.configured.append(_describe(s.key))
            applied[s.key] = s
        self._commit(self.files, applied, self.workloads)
        return out

    def delete(self, sources: list[tuple[str, bytes]]) -> ChangeOutcome:
        keys = [StoredResource.of(r).key for r in load_sources(sources)]
        return self._serialised(lambda: self._delete(keys))

    def _delete(self, keys: list[ResourceKey]) -> ChangeOutcome:
        out = ChangeOutcome()
        applied = dict(self.applied)
        for k in keys:
            if k in applied:
                del applied[k]
                out.deleted.append(_describe(k))
            elif k in self.files:
                s = self.files[k]
                raise ConfigError(
                    f"{_describe(k)} is defined by the watched directory ({s.resource.file} document "
                    f"{s.resource.document}); remove it there",
                    file=s.resource.file, document=s.resource.document, kind=k.kind, name=f"{k.namespace}/{k.name}",
                    field_path="$.metadata.name",
                )
            else:
                raise ConfigError(f"{_describe(k)} not found", kind=k.kind, name=f"{k.namespace}/{k.name}",
                                  field_path="$.metadata.name")
        self._commit(self.files, applied, self.workloads)
        return out

    # ---- registered workloads

    def register_workload(
        self, node_id: str, namespace: str, labels: Mapping[str, str], address: str,
        ports: Mapping[str, int], service_account: str,
    ) -> ResourceKey:
        """Add a proxy's workload as a WorkloadEntry (name: its node id). Raises ConfigError when it
        would make the state invalid (e.g. an address that is not an IP for a STATIC service)."""
        obj = WorkloadEntry(
            api_version="networking.istio.io/v1",
            kind="WorkloadEntry",
            metadata=ObjectMeta(name=node_id, namespace=namespace),
            spec=WorkloadEntrySpec(address=address, labels=dict(labels), ports=dict(ports),
                                   service_account=service_account),
        )
        s = StoredResource.of(Resource(obj, file=f"<registered by proxy {node_id}>", document=0))
        workloads = dict(self.workloads)
        workloads[s.key] = s
        self._commit(self.files, self.applied, workloads)
        return s.key

    def unregister_workload(self, key: ResourceKey) -> bool:
        if key not in self.workloads:
            return False
        workloads = dict(self.workloads)
        del workloads[key]
        try:
            return self._commit(self.files, self.applied, workloads)
        except ConfigError:
            # removing an endpoint cannot invalidate references; keep it registered if it somehow does
            return False
