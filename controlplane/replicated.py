"""Control-plane replicas sharing their state through etcd: the applied layer, every proxy registration,
and a watch that brings each replica what the others wrote.

Theory of operation.
- Keys (all under `/triomesh/controlplane/`): `applied` holds the applied layer (a PersistedState
  document with no workloads); `registrations/<namespace>/<node id>` holds one registered WorkloadEntry
  (a PersistedResource), attached to the lease of the replica the proxy registered on. The replica
  renews its lease every third of its TTL (the grace period); when the replica dies, the lease expires
  and etcd deletes its proxies' registrations, unless the proxies registered again on another replica
  first (their keys then carry that replica's lease).
- Writes: an apply/delete is planned and validated by the ConfigStore, written with a transaction that
  compares the applied key's mod_revision with the one this replica holds (another replica's write in
  between fails it: the replica reads the newer layer, takes it and plans the change again on top), and
  only then installed and acknowledged. A lock serialises every change of the store, so nothing changes
  it between planning and installing. A registration is validated and installed, then put with the
  lease outside the lock (many proxies registering at once overlap their etcd round trips); until the
  put succeeds, this replica's own entry is what it serves for that key.
- Reads: one watch on the whole prefix, from the revision after the last one seen; a watch that breaks
  (its member died) is resumed from there on the next member; a compacted revision means a full read
  of the prefix. A full read also runs every `resync_interval_s` as a safety net (one range request).
  `Mirror` is what etcd holds as last heard, newest revision per key; the store takes its layers whole,
  plus the registrations of this replica's own proxies that etcd does not hold yet.
- etcd unreachable: the replica serves its last state, refuses applies (EtcdClient's error), keeps its
  proxies' registrations locally and writes them when the store is back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from controlplane.durable import (
    PersistedResource,
    PersistedState,
    StoreError,
    decode_state,
    encode_state,
)
from controlplane.etcd import (
    EtcdClient,
    EtcdUnavailable,
    KeyValue,
    WatchCanceled,
    WatchCompacted,
)
from controlplane.snapshots import StoredResource
from controlplane.store import (
    ChangeOutcome,
    ConfigStore,
    Layer,
    Prepared,
    persisted,
    stored_resource,
)
from controlplane.wire import ResourceKey
from proxy.config.errors import ConfigError

PREFIX = b"/triomesh/controlplane/"
APPLIED_KEY = PREFIX + b"applied"
REGISTRATIONS_PREFIX = PREFIX + b"registrations/"

_resource_encoder = msgspec.msgpack.Encoder()
_resource_decoder = msgspec.msgpack.Decoder(PersistedResource)


def registration_key(key: ResourceKey) -> bytes:
    return REGISTRATIONS_PREFIX + f"{key.namespace}/{key.name}".encode()


@dataclass
class _Entry:
    revision: int
    resource: StoredResource | None  # None: deleted


class Mirror:
    """What etcd holds under the prefix as this replica last heard it (sans-IO). Each key keeps its
    newest revision: an older event (a watch catching up with this replica's own write) is ignored."""

    def __init__(self) -> None:
        self.applied_revision = 0
        self.applied: Layer = {}
        self.applied_error = ""  # the stored layer is not one this replica can read
        self.registrations: dict[bytes, _Entry] = {}
        self.rejected: dict[bytes, str] = {}  # registration keys whose value this replica cannot read

    def reset(self, kvs: list[KeyValue]) -> None:
        """What a full read of the prefix found (authoritative: a key it lacks does not exist)."""
        self.set_applied(None)
        self.registrations.clear()
        self.rejected.clear()
        for kv in kvs:
            self.update(kv.key, kv.value, kv.mod_revision)

    def set_applied(self, kv: KeyValue | None) -> None:
        """The applied key as just read (None: it does not exist, so a write compares with 0)."""
        self.applied_revision, self.applied, self.applied_error = 0, {}, ""
        if kv is not None:
            self.update(kv.key, kv.value, kv.mod_revision)

    def update(self, key: bytes, value: bytes | None, revision: int) -> bool:
        """Take one key's event. False when it was older than what the mirror holds (nothing changed)."""
        if key == APPLIED_KEY:
            if revision <= self.applied_revision:
                return False
            self.applied_revision = revision
            self.applied_error = ""
            try:
                state = decode_state(value) if value is not None else None
                self.applied = {s.key: s for s in map(stored_resource, state.applied)} if state is not None else {}
            except (StoreError, ConfigError) as e:
                self.applied_error = f"{APPLIED_KEY.decode()} at revision {revision}: {e}"
        elif key.startswith(REGISTRATIONS_PREFIX):
            entry = self.registrations.get(key)
            if entry is not None and revision <= entry.revision:
                return False
            self.rejected.pop(key, None)
            resource = None
            if value is not None:
                try:
                    resource = stored_resource(_resource_decoder.decode(value))
                except (msgspec.DecodeError, ConfigError) as e:
                    self.rejected[key] = f"{key.decode(errors='replace')}: {e}"
            self.registrations[key] = _Entry(revision, resource)
        return True

    def put_registration(self, s: StoredResource, revision: int) -> None:
        """This replica's own write, at `revision` (unless the watch brought a newer one already)."""
        key = registration_key(s.key)
        entry = self.registrations.get(key)
        if entry is None or revision > entry.revision:
            self.registrations[key] = _Entry(revision, s)

    def workloads(self) -> Layer:
        return {e.resource.key: e.resource for e in self.registrations.values() if e.resource is not None}


def _digests(layer: Layer) -> dict[ResourceKey, str]:
    return {k: s.digest for k, s in layer.items()}


class Replication:
    def __init__(self, client: EtcdClient, store: ConfigStore, log: Any, *, lease_ttl_s: float,
                 resync_interval_s: float = 60.0) -> None:
        self.client = client
        self.store = store
        self.log = log
        self.lease_ttl_s = max(2, math.ceil(lease_ttl_s))
        self.resync_interval_s = resync_interval_s
        self.lock = trio.Lock()  # every change of the store, from planning to installing
        self._lease_lock = trio.Lock()
        self.mirror = Mirror()
        self.lease = 0
        self.owned: dict[ResourceKey, StoredResource] = {}  # registrations of this replica's proxies
        self._unwritten: set[ResourceKey] = set()  # owned ones etcd may not hold yet (being written, or it was down)
        self._undeleted: set[ResourceKey] = set()  # expired ones whose key may still be there
        self.on_change: Callable[[str], None] = lambda reason: None
        self._unavailable = ""
        self._rejected = ""

    def __str__(self) -> str:
        return str(self.client)

    # ---- health, logged once per state

    def _failed(self, error: EtcdUnavailable | WatchCanceled) -> None:
        if str(error) != self._unavailable:
            self._unavailable = str(error)
            self.log.error("store_unavailable", store=str(self), error=self._unavailable, serving=self.store.version)

    def _answered(self) -> None:
        if self._unavailable:
            self._unavailable = ""
            self.log.info("store_available", store=str(self), revision=self.store.shared_revision)

    # ---- taking what etcd holds

    def _take(self, reason: str) -> None:
        """Install the mirror's layers (the lock is held)."""
        mirror = self.mirror
        problems = [mirror.applied_error, *mirror.rejected.values()]
        applied, revision = mirror.applied, mirror.applied_revision
        if mirror.applied_error:  # keep serving the layer this replica has
            applied, revision = self.store.applied, self.store.shared_revision
        workloads = mirror.workloads()
        for key in self._unwritten:  # not in etcd yet (being written, or it was down): served from here
            if key in self.owned:
                workloads[key] = self.owned[key]
        try:
            changed = self.store.take_shared(applied, revision, workloads)
        except ConfigError as e:
            problems.append(str(e))
            changed = False
        rejected = "; ".join(p for p in problems if p)
        if rejected and rejected != self._rejected:
            self.log.error("config_rejected", source="store", store=str(self), error=rejected,
                           keeping_version=self.store.version)
        self._rejected = rejected
        if changed:
            self.on_change(reason)

    async def _read_all(self) -> int:
        """A full read of the prefix, taken. The revision it saw. Raises EtcdUnavailable."""
        async with self.lock:  # a write of this replica between the read and the reset would be lost
            result = await self.client.range(PREFIX, prefix=True)
            self.mirror.reset(result.kvs)
            self._take("store")
        self._answered()
        return result.revision

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read etcd once (before the control plane serves, so it starts from the shared state), then
        follow it with a watch; keep this replica's lease alive."""
        revision = 0
        try:
            revision = await self._read_all()
        except EtcdUnavailable as e:  # serve the data directory's copy; catch up when the store is back
            self._failed(e)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_lease)
            task_status.started()
            backoff_s = 0.2
            while True:
                try:
                    if not revision:
                        revision = await self._read_all()
                    with trio.move_on_after(self.resync_interval_s) as resync:
                        revision = await self._follow(revision)
                    if resync.cancelled_caught:
                        revision = 0  # the safety re-read
                    backoff_s = 0.2
                except WatchCompacted:
                    revision = 0
                    continue
                except (EtcdUnavailable, WatchCanceled) as e:
                    self._failed(e)
                    await trio.sleep(backoff_s)
                    backoff_s = min(2 * backoff_s, 2.0)

    async def _follow(self, revision: int) -> int:
        """Watch from after `revision` until the stream ends. The last revision seen."""
        async with contextlib.aclosing(self.client.watch(PREFIX, revision + 1)) as batches:
            async for events in batches:
                self._answered()
                if not events:
                    continue  # the watch is set up (or a progress notice)
                async with self.lock:
                    taken = False
                    for event in events:
                        taken |= self.mirror.update(event.key, event.value, event.mod_revision)
                        revision = max(revision, event.mod_revision)
                    if taken:  # not only this replica's own writes coming back (each taking means a compile)
                        self._take("store")
        await trio.sleep(0.05)  # the member went away: resume on the next one
        return revision

    # ---- applies and deletes

    async def change(self, plan: Callable[[], tuple[ChangeOutcome, Prepared]]) -> ChangeOutcome:
        """Run an apply/delete planned by `plan` (a ConfigStore.plan_apply/plan_delete call) through
        etcd. Raises ConfigError: invalid, or not stored (nothing changed)."""
        async with self.lock:
            for _ in range(8):
                outcome, prepared = plan()
                if _digests(prepared.applied) == _digests(self.store.applied):  # nothing to store
                    self.store.install(prepared)
                    return outcome
                document = encode_state(PersistedState(applied=[persisted(s) for s in prepared.applied.values()]))
                try:
                    revision = await self.client.put_if_unchanged(APPLIED_KEY, document, self.store.shared_revision)
                    if revision is None:  # another replica wrote first: take its layer, plan again on top
                        result = await self.client.range(APPLIED_KEY)
                        self.mirror.set_applied(result.kvs[0] if result.kvs else None)
                        self._take("store")
                        continue
                except EtcdUnavailable as e:
                    self._failed(e)
                    raise ConfigError(f"cannot store the change: {e}; nothing was changed (the control plane keeps "
                                      "serving its last state; apply again when the store is back)",
                                      file=str(self)) from e
                self._answered()
                self.mirror.update(APPLIED_KEY, document, revision)
                self.store.install(prepared, shared_revision=revision)
                return outcome
        raise ConfigError("cannot store the change: the shared store kept changing under it; nothing was changed",
                          file=str(self))

    # ---- registrations

    async def register(self, s: StoredResource, replaces: ResourceKey | None = None) -> None:
        """Serve a proxy's WorkloadEntry and store it on this replica's lease. Raises ConfigError (it
        would make the state invalid). The etcd write runs outside the change lock, so proxies
        registering at once share etcd's round trips instead of queueing for them; until it is written
        (with etcd down: until it is back) this replica serves the entry as its own."""
        async with self.lock:
            workloads = dict(self.store.workloads)
            replaced = replaces is not None and replaces != s.key
            if replaced:
                workloads.pop(replaces, None)
                self.owned.pop(replaces, None)
                self._unwritten.discard(replaces)
            workloads[s.key] = s
            self.store.install(self.store.plan_workloads(workloads))
            self.owned[s.key] = s
            self._unwritten.add(s.key)
            self._undeleted.discard(s.key)
        if replaced:
            await self._delete_registration(replaces)
            async with self.lock:
                self._take("workload_registered")
        await self._write_registration(s)

    async def unregister(self, key: ResourceKey, reason: str) -> None:
        """Remove a registration of this replica's proxy (disconnected past its grace period, or no
        longer registering). Its key is deleted only while it is on this replica's lease: a proxy that
        registered on another replica since stays registered."""
        async with self.lock:
            self.owned.pop(key, None)
            self._unwritten.discard(key)
            await self._delete_registration(key)
            self._take(reason)

    async def _write_registration(self, s: StoredResource) -> None:
        try:
            lease = await self._current_lease()
            revision = await self.client.put(registration_key(s.key), _resource_encoder.encode(persisted(s)), lease=lease)
        except EtcdUnavailable as e:
            self._failed(e)
            self._unwritten.add(s.key)
            return
        self._unwritten.discard(s.key)
        self.mirror.put_registration(s, revision)

    async def _delete_registration(self, key: ResourceKey) -> None:
        if not self.lease:
            return
        try:
            revision = await self.client.delete_if_lease(registration_key(key), self.lease)
        except EtcdUnavailable as e:
            self._failed(e)
            self._undeleted.add(key)
            return
        self._undeleted.discard(key)
        if revision is not None:
            self.mirror.update(registration_key(key), None, revision)

    async def _current_lease(self) -> int:
        async with self._lease_lock:  # registrations written at once share one lease
            return self.lease or await self._grant()

    async def _grant(self) -> int:
        self.lease = await self.client.grant_lease(self.lease_ttl_s)
        self.log.info("store_lease_granted", store=str(self), lease=format(self.lease, "x"), ttl_s=self.lease_ttl_s)
        return self.lease

    async def _keep_lease(self) -> None:
        """Renew the lease; when it has expired (etcd was unreachable for longer than its TTL), take a
        new one and write this replica's registrations again, as after any failed write."""
        while True:
            await trio.sleep(self.lease_ttl_s / 3)
            try:
                if self.lease and not await self.client.keep_alive(self.lease):
                    self.log.warning("store_lease_expired", store=str(self), lease=format(self.lease, "x"))
                    self.lease = 0
                    self._unwritten.update(self.owned)
                if self._unwritten or self._undeleted:
                    for key in list(self._unwritten):
                        if key in self.owned:
                            await self._write_registration(self.owned[key])
                    for key in list(self._undeleted):
                        await self._delete_registration(key)
                    async with self.lock:
                        self._take("store")
            except EtcdUnavailable as e:
                self._failed(e)
