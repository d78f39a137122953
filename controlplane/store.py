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
Replicated on etcd (controlplane/replicated.py), a change is planned here (`plan_*`: the new layers,
validated), written to etcd, then installed (`install`); the applied and workloads layers are the ones
etcd holds, and the config version is derived from them (`version`).

Sync; its IO is the watched directory's files and the data directory; the server calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from controlplane.durable import DataDirectory, PersistedResource, PersistedState
from controlplane.snapshots import ProxyClass, StoredResource, ViewCache, representative_classes, view_version
from controlplane.wire import ResourceKey, decode_istio
from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.istio import ObjectMeta, WorkloadEntry, WorkloadEntrySpec
from proxy.config.load import Resource, check_duplicates, load_bytes
from proxy.runner.config_source import Fingerprint, fingerprint
from proxy.runner.config_watch import CompleteRead

Layer = dict[ResourceKey, StoredResource]


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())


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
    return [persisted(s) for s in layer.values()]


def persisted(s: StoredResource) -> PersistedResource:
    return PersistedResource(s.body, s.resource.file, s.resource.document)


def stored_resource(r: PersistedResource) -> StoredResource:
    """Raises ConfigError for a body the loader refuses now."""
    return StoredResource.of(decode_istio(r.body, file=r.file, document=r.document))


def _layer(stored: list[PersistedResource]) -> Layer:
    resources = (stored_resource(r) for r in stored)
    return {s.key: s for s in resources}


@dataclass(frozen=True)
class Prepared:
    """A validated change, not yet installed: the new layers and their merged state."""

    files: Layer
    applied: Layer
    workloads: Layer
    state: dict[ResourceKey, StoredResource]
    base: dict[ResourceKey, StoredResource]  # the state it was planned on


class StaleChange(Exception):
    """The state changed between planning a change and installing it: plan it again."""


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
        replicated: bool = False,
    ) -> None:
        self.config_dir = config_dir
        self.data = data
        # replicated: the applied and workloads layers are etcd's (the data directory caches them)
        self.replicated = replicated
        self.shared_revision = 0  # the applied layer's etcd revision this store holds
        self.content_hash = ""  # of the merged state, when replicated
        self._restored: PersistedState | None = None  # until the first commit after a restore
        self.extra_classes = extra_classes  # the classes of connected proxies (from the server)
        self._narrowed: dict[ProxyClass, ProxyClass] = {}  # see validate
        self._narrowed_keys: frozenset[str] = frozenset()
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
        """The control plane's config version. Alone, a count of accepted changes. Replicated, derived
        from what every replica shares, so equal content shows the same version on every replica and
        after a restart: `<applied layer's etcd revision>-<hash of the merged content>` (the content
        being the watched files, the applied layer and every replica's registrations)."""
        if self.replicated:
            return f"{self.shared_revision}-{self.content_hash}"
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

        # narrowed classes from the last validation with the same keys (thousands of connected proxies,
        # the same classes change after change); kept for the classes seen this time only
        known = self._narrowed if self._narrowed_keys == keys else {}
        seen: dict[ProxyClass, ProxyClass] = {}

        def narrow(pc: ProxyClass) -> ProxyClass:
            narrowed = known.get(pc)
            if narrowed is None:
                narrowed = ProxyClass(pc.namespace, frozenset(kv for kv in pc.labels if kv[0] in keys))
            seen[pc] = narrowed
            return narrowed

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
        self._narrowed, self._narrowed_keys = seen, keys
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

    def prepare(self, files: Layer, applied: Layer, workloads: Layer) -> Prepared:
        """Validate new layers. Raises ConfigError."""
        state = self.merge(files, applied, workloads)
        self.validate(state)
        return Prepared(files, applied, workloads, state, self.state)

    def _commit(self, files: Layer, applied: Layer, workloads: Layer, *, shared_revision: int | None = None) -> bool:
        return self.install(self.prepare(files, applied, workloads), shared_revision=shared_revision)

    def install(self, prepared: Prepared, *, shared_revision: int | None = None) -> bool:
        """Make a prepared change the state (persisting it first). `shared_revision`: the applied
        layer's etcd revision from now on. True when the merged state changed. Raises StaleChange,
        or ConfigError when the data directory cannot be written."""
        if prepared.base is not self.state:
            raise StaleChange()
        files, applied, workloads, state = prepared.files, prepared.applied, prepared.workloads, prepared.state
        changed = _differs(self.state, state)
        generation = self.generation + 1 if changed else self.generation
        if self._restored is not None:  # the first commit after a restart: the directory's files are back
            same = self._restored.content_version == content_version(state)
            generation = self._restored.generation if same else self._restored.generation + 1
        revision = self.shared_revision if shared_revision is None else shared_revision
        if self.data is not None and (generation != self.generation or _differs(self.applied, applied)
                                      or _differs(self.workloads, workloads) or self._restored is not None
                                      or revision != self.shared_revision):
            self._persist(generation, state, applied, workloads, revision)
        self._restored = None
        self.shared_revision = revision
        self.files, self.applied, self.workloads = files, applied, workloads
        self.state = state
        self.generation = generation
        if self.replicated:
            self.content_hash = content_version(state)
        return changed

    def _persist(self, generation: int, state: Mapping[ResourceKey, StoredResource], applied: Layer,
                 workloads: Layer, shared_revision: int) -> None:
        assert self.data is not None
        try:
            self.data.commit(PersistedState(generation=generation, content_version=content_version(state),
                                            applied=_persisted(applied), workloads=_persisted(workloads),
                                            shared_revision=shared_revision))
        except OSError as e:
            raise ConfigError(f"cannot store the change: {e.strerror or e}; nothing was changed",
                              file=str(self.data.state_path)) from e

    def take_shared(self, applied: Layer, revision: int, workloads: Layer) -> bool:
        """Adopt the layers etcd holds (another replica's apply, registrations through any replica).
        True when the state changed. Raises ConfigError (they do not validate with this replica's
        files; state kept)."""
        return self._commit(self.files, applied, workloads, shared_revision=revision)

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
        self.shared_revision = stored.shared_revision
        self._restored = stored
        if self.replicated:
            self.content_hash = content_version(self.state)

    # ---- the watched directory

    def load_directory(self, complete: CompleteRead | None = None) -> bool:
        """Take the watched directory's files: as `complete` read them (the watcher's read of complete
        files, proxy/runner/config_watch.py), or read now (start-up, tests). True when the state
        changed. Raises ConfigError (state kept)."""
        if self.config_dir is None:
            return False
        if complete is None:
            before = fingerprint(self.config_dir)  # before reading: a write during the read shows as a change
            complete = CompleteRead(self.read_directory(), before)
        self.fingerprint = complete.fingerprint  # a refused content is not read again until it changes
        files = {s.key: s for s in map(StoredResource.of, load_sources(complete.sources))}
        return self._commit(files, self.applied, self.workloads)

    def read_directory(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) of the directory's *.yaml/*.yml files, none for an empty directory.
        Raises ConfigError."""
        assert self.config_dir is not None
        if not self.config_dir.is_dir():
            raise ConfigError("not a directory", file=str(self.config_dir))
        sources = []
        for f in _yaml_files(self.config_dir):
            try:
                sources.append((str(f), f.read_bytes()))
            except OSError as e:
                raise ConfigError(f"cannot read: {e.strerror}", file=str(f)) from e
        return sources

    def directory_changed(self) -> bool:
        return self.config_dir is not None and fingerprint(self.config_dir) != self.fingerprint

    # ---- apply / delete

    def apply(self, sources: list[tuple[str, bytes]]) -> ChangeOutcome:
        outcome, prepared = self.plan_apply(load_resources(sources))
        self.install(prepared)
        return outcome

    def plan_apply(self, resources: list[StoredResource]) -> tuple[ChangeOutcome, Prepared]:
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
        return out, self.prepare(self.files, applied, self.workloads)

    def delete(self, sources: list[tuple[str, bytes]]) -> ChangeOutcome:
        outcome, prepared = self.plan_delete([s.key for s in load_resources(sources)])
        self.install(prepared)
        return outcome

    def plan_delete(self, keys: list[ResourceKey]) -> tuple[ChangeOutcome, Prepared]:
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
        return out, self.prepare(self.files, applied, self.workloads)

    # ---- registered workloads

    def register_workload(
        self, node_id: str, namespace: str, labels: Mapping[str, str], address: str,
        ports: Mapping[str, int], service_account: str,
    ) -> ResourceKey:
        """Add a proxy's workload as a WorkloadEntry (name: its node id). Raises ConfigError when it
        would make the state invalid (e.g. an address that is not an IP for a STATIC service)."""
        s = workload_entry(node_id, namespace, labels, address, ports, service_account)
        self.install(self.plan_workloads({**self.workloads, s.key: s}))
        return s.key

    def plan_workloads(self, workloads: Layer) -> Prepared:
        return self.prepare(self.files, self.applied, workloads)

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


def load_resources(sources: Iterable[tuple[str, bytes]]) -> list[StoredResource]:
    return [StoredResource.of(r) for r in load_sources(sources)]


def workload_entry(node_id: str, namespace: str, labels: Mapping[str, str], address: str, ports: Mapping[str, int],
                   service_account: str) -> StoredResource:
    """The WorkloadEntry a registering proxy stands for (name: its node id)."""
    obj = WorkloadEntry(
        api_version="networking.istio.io/v1",
        kind="WorkloadEntry",
        metadata=ObjectMeta(name=node_id, namespace=namespace),
        spec=WorkloadEntrySpec(address=address, labels=dict(labels), ports=dict(ports), service_account=service_account),
    )
    return StoredResource.of(Resource(obj, file=f"<registered by proxy {node_id}>", document=0))
