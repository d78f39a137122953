"""Two control-plane replicas sharing their applied resources through a real etcd (Debian's
etcd-server, one member started here on free loopback ports with a temporary data directory): an apply through
one reaches a proxy of the other, concurrent applies through both are serialised (both kept), and
with etcd down the replicas keep serving and refuse writes with a clear error, then catch up.
Every process is started here and stopped by PID."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cp_fixtures import split, write_mesh
from etcd_processes import EtcdCluster, wait_until

from tests.runner.harness import ControlPlane, free_port, triomesh

SIM_PROXY = Path(__file__).with_name("sim_proxy.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs etcd (Debian etcd-server; `make test` installs it)")


class SimProxy:
    def __init__(self, tmp: Path, address: str, node_id: str) -> None:
        self.out = tmp / f"{node_id}.out"
        self.proc = subprocess.Popen([sys.executable, str(SIM_PROXY), address, node_id, "tutorial"], cwd=REPO,
                                     stdout=open(self.out, "wb"), stderr=subprocess.DEVNULL)

    def routes(self) -> dict:
        lines = [l for l in self.out.read_text().splitlines() if l.strip()] if self.out.exists() else []
        return json.loads(lines[-1])["routes"] if lines else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


def extra_service(name: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: tutorial}}
spec:
  hosts: [{name}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: 18090}}}}]
"""


def test_replicas_share_applies_through_etcd_and_refuse_writes_while_it_is_down(tmp_path, procs):
    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    config = write_mesh(tmp_path / "config")
    a, b = (ControlPlane(config, tmp_path, extra_args=["--data-dir", str(tmp_path / f"data-{n}"), "--store", etcd.url])
            for n in "ab")
    procs.extend([a.start(), b.start()])
    proxy = SimProxy(tmp_path, b.address, "on-b")
    procs.append(proxy)
    wait_until(lambda: proxy.routes() == {"recommendation": [80, 20]}, what="proxy synced from b")

    # an apply through a reaches the proxy connected to b
    change = tmp_path / "change.yaml"
    change.write_text(split(10, 90))
    r = a.cli("apply", "-f", str(change))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: proxy.routes() == {"recommendation": [10, 90]}, what="a's apply pushed by b")

    # two applies at once, one per replica: compare-and-swap serialises them, both are kept
    for name in ("extra-a", "extra-b"):
        (tmp_path / f"{name}.yaml").write_text(extra_service(name))
    both = [subprocess.Popen([sys.executable, "-m", "proxy.cli", "apply", "-f", str(tmp_path / f"{name}.yaml"),
                              "--controlplane", cp.address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, cp in (("extra-a", a), ("extra-b", b))]
    assert [p.wait(30) for p in both] == [0, 0], [p.stderr.read() for p in both]
    for p in both:
        p.stdout.close()
        p.stderr.close()
    r = triomesh("delete", "-f", str(tmp_path / "extra-a.yaml"), "-f", str(tmp_path / "extra-b.yaml"),
                 "--controlplane", a.address)  # only succeeds if a holds both
    assert r.returncode == 0 and r.stdout.splitlines()[:2] == [b"ServiceEntry tutorial/extra-a deleted",
                                                              b"ServiceEntry tutorial/extra-b deleted"], r.stderr

    # etcd goes away: writes are refused by name, the replicas keep serving what they have
    etcd.kill()
    change.write_text(split(50, 50))
    r = a.cli("apply", "-f", str(change))
    assert r.returncode == 1 and b"etcd unavailable" in r.stderr and b"nothing was changed" in r.stderr, r.stderr
    assert proxy.routes() == {"recommendation": [10, 90]}
    assert [p.get("connected", True) for p in b.status()["proxies"]] == [True]  # omitted when true
    # it comes back: writes work again and reach the other replica's proxies
    etcd.start()
    r = a.cli("apply", "-f", str(change))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: proxy.routes() == {"recommendation": [50, 50]}, what="apply after etcd came back")
    assert "store_unavailable" in b.log_text() and "store_available" in b.log_text()


async def test_a_stale_replica_retries_its_apply_on_top_of_the_other_ones(tmp_path, procs):
    """Deterministic compare-and-swap: b has not seen a's apply when it applies; its write fails the
    revision compare, b takes a's layer and applies on top of it."""
    from controlplane.etcd import EtcdClient, parse_store_url
    from controlplane.replicated import APPLIED_KEY, Replication
    from controlplane.store import ConfigStore, load_resources
    from proxy import logging as tm_logging

    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    config = write_mesh(tmp_path / "config")
    log = tm_logging.get_logger("test")
    stores = [ConfigStore(config, replicated=True) for _ in range(2)]
    a, b = (Replication(EtcdClient(parse_store_url(etcd.url)), store, log, lease_ttl_s=5) for store in stores)
    for replica in (a, b):
        replica.store.load_directory()
        await replica._read_all()  # what `run` does first; no watch here, so b stays stale
    extra_a, extra_b = (load_resources([(f"{n}.yaml", extra_service(n).encode())]) for n in ("extra-a", "extra-b"))
    await a.change(lambda: a.store.plan_apply(extra_a))
    outcome = await b.change(lambda: b.store.plan_apply(extra_b))
    assert outcome.created == ["ServiceEntry tutorial/extra-b"]
    assert {k.name for k in b.store.applied} == {"extra-a", "extra-b"}
    assert b.store.shared_revision > a.store.shared_revision
    stored = await b.client.range(APPLIED_KEY)
    assert [kv.mod_revision for kv in stored.kvs] == [b.store.shared_revision]
    # a catches up by a full read; then both show one version for one content
    await a._read_all()
    assert {k.name for k in a.store.applied} == {"extra-a", "extra-b"}
    assert a.store.version == b.store.version and a.store.version.startswith(f"{b.store.shared_revision}-")


async def test_the_client_fails_over_past_a_dead_member_and_names_each_member_when_none_answers(tmp_path, procs):
    from controlplane.etcd import EtcdClient, EtcdUnavailable, parse_store_url

    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    client = EtcdClient(parse_store_url(f"etcd://{dead},{etcd.url[len('etcd://'):]}"))
    revision = await client.put(b"/k", b"v")
    assert (await client.range(b"/k")).kvs[0].mod_revision == revision
    assert client._preferred == 1  # the member that answered is asked first next time
    nobody = EtcdClient(parse_store_url(f"etcd://{dead},127.0.0.1:{free_port()}"), deadline_s=0.5)
    with pytest.raises(EtcdUnavailable, match=rf"etcd unavailable \({dead}: .*refused.*; 127\.0\.0\.1:\d+: .*refused"):
        await nobody.range(b"/k")


async def test_a_watch_reports_puts_and_deletes_and_a_compacted_start_revision(tmp_path, procs):
    from controlplane.etcd import EtcdClient, WatchCompacted, parse_store_url

    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    client = EtcdClient(parse_store_url(etcd.url))
    first = await client.put(b"/p/a", b"1")
    await client.put(b"/other", b"x")  # outside the prefix
    await client.put(b"/p/b", b"2")
    await client.call("/v3/kv/deleterange", {"key": base64.b64encode(b"/p/a").decode()})
    seen = []
    with trio.fail_after(5):
        async with contextlib.aclosing(client.watch(b"/p/", first + 1)) as batches:
            async for events in batches:
                seen.extend((e.key, e.value) for e in events)
                if len(seen) >= 2:
                    break
    assert seen == [(b"/p/b", b"2"), (b"/p/a", None)]
    latest = await client.put(b"/p/c", b"3")
    await client.call("/v3/kv/compaction", {"revision": str(latest), "physical": True})
    with pytest.raises(WatchCompacted):
        async with contextlib.aclosing(client.watch(b"/p/", first)) as batches:
            async for _ in batches:
                pass


def test_the_mirror_keeps_the_newest_revision_per_key_and_sets_aside_what_it_cannot_read():
    from controlplane.replicated import REGISTRATIONS_PREFIX, Mirror, registration_key
    from controlplane.store import workload_entry

    entry = workload_entry("rec-3", "tutorial", {"app": "recommendation"}, "127.0.0.3", {"http": 18085}, "")
    mirror = Mirror()
    mirror.put_registration(entry, 10)
    mirror.update(registration_key(entry.key), None, 9)  # an older delete, seen after this replica's write
    assert list(mirror.workloads()) == [entry.key]
    mirror.update(registration_key(entry.key), None, 11)
    assert mirror.workloads() == {}
    mirror.update(REGISTRATIONS_PREFIX + b"tutorial/bad", b"\xc1", 12)
    assert mirror.workloads() == {} and "tutorial/bad" in mirror.rejected[REGISTRATIONS_PREFIX + b"tutorial/bad"]


async def test_a_replica_whose_lease_expired_writes_its_proxies_registrations_again(tmp_path, procs):
    """As after etcd was unreachable for longer than the lease TTL: etcd deleted the registrations
    (the watch removes them), the replica notices at its next renewal, takes a new lease and writes
    the registrations of its proxies again."""
    from controlplane.etcd import EtcdClient, parse_store_url
    from controlplane.replicated import Replication, registration_key
    from controlplane.store import ConfigStore, workload_entry
    from proxy import logging as tm_logging

    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    store = ConfigStore(write_mesh(tmp_path / "config"), replicated=True)
    store.load_directory()
    client = EtcdClient(parse_store_url(etcd.url))
    replica = Replication(client, store, tm_logging.get_logger("test"), lease_ttl_s=2)
    entry = workload_entry("rec-3", "tutorial", {"app": "recommendation", "version": "v3"}, "127.0.0.9",
                           {"http": 18085}, "")
    key = registration_key(entry.key)
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        await replica.register(entry)
        lease = replica.lease
        assert [kv.lease for kv in (await client.range(key)).kvs] == [lease] and entry.key in store.workloads
        await client.call("/v3/lease/revoke", {"ID": str(lease)})
        with trio.fail_after(5):
            while not ((kvs := (await client.range(key)).kvs) and kvs[0].lease not in (0, lease)):
                await trio.sleep(0.05)
        assert replica.lease == kvs[0].lease and entry.key in store.workloads
        nursery.cancel_scope.cancel()


async def test_a_registration_reaches_the_other_replica_and_expires_with_its_replica_s_lease(tmp_path, procs):
    """Replica a registers a proxy's workload; b serves it (its watch); a dies without a word (its
    tasks stop, its lease is no longer renewed): after the lease TTL etcd deletes the key and b drops
    the endpoint."""
    from controlplane.etcd import EtcdClient, parse_store_url
    from controlplane.replicated import Replication
    from controlplane.store import ConfigStore, workload_entry
    from proxy import logging as tm_logging

    etcd = EtcdCluster(tmp_path).start()
    procs.append(etcd)
    config = write_mesh(tmp_path / "config")
    replicas = []
    for _ in range(2):
        store = ConfigStore(config, replicated=True)
        store.load_directory()
        replicas.append(Replication(EtcdClient(parse_store_url(etcd.url)), store, tm_logging.get_logger("test"),
                                    lease_ttl_s=2))
    a, b = replicas
    entry = workload_entry("rec-3", "tutorial", {"app": "recommendation", "version": "v3"}, "127.0.0.9",
                           {"http": 18085}, "")
    changes = []
    b.on_change = changes.append
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        async with trio.open_nursery() as a_tasks:
            await a_tasks.start(a.run)
            await a.register(entry)
            with trio.fail_after(5):
                while entry.key not in b.store.state:
                    await trio.sleep(0.02)
            assert b.store.version == a.store.version and changes == ["store"]
            a_tasks.cancel_scope.cancel()  # a is gone
        gone = trio.current_time()
        with trio.fail_after(6):
            while entry.key in b.store.state:
                await trio.sleep(0.05)
        assert trio.current_time() - gone > 1.0  # removed by the lease's expiry, not by a
        assert changes == ["store", "store"]
        nursery.cancel_scope.cancel()
