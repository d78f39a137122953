"""The data directory: what a restarted control plane gets back, the lock, a refused write, and a
writer killed (SIGKILL) in the middle of its commits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.durable import DataDirectory, PersistedState, StoreError
from controlplane.store import ConfigStore, content_version
from controlplane.wire import ResourceKey
from proxy.config.errors import ConfigError

from cp_fixtures import split, write_mesh

VS_KEY = ResourceKey("VirtualService", "tutorial", "recommendation")
REPO = Path(__file__).resolve().parents[2]


def _store(config: Path, data: Path) -> ConfigStore:
    store = ConfigStore(config, data=DataDirectory(data).open())
    store.restore()
    store.load_directory()
    return store


def _weights(store: ConfigStore) -> list[int]:
    return [rd.weight for rd in store.state[VS_KEY].resource.obj.spec.http[0].route]


def test_a_restart_brings_back_applies_deletes_registrations_and_the_version(tmp_path):
    config, data = tmp_path / "config", tmp_path / "data"
    write_mesh(config)
    store = _store(config, data)
    store.apply([("a.yaml", split(10, 90).encode())])
    key = store.register_workload("rec-3", "tutorial", {"app": "recommendation", "version": "v1"}, "127.0.0.3",
                                  {"http": 8080}, "rec")
    version, content = store.version, content_version(store.state)
    assert version == "3"
    store.data.close()

    again = _store(config, data)
    assert again.version == version and content_version(again.state) == content
    assert _weights(again) == [10, 90] and key in again.workloads
    assert again.state[key].resource.file == "<registered by proxy rec-3>"
    # a delete after the restart is stored too: the file's version is back after the next restart
    again.delete([("a.yaml", split(10, 90).encode())])
    again.unregister_workload(key)
    assert again.version == "5"
    again.data.close()
    third = _store(config, data)
    assert third.version == "5" and _weights(third) == [80, 20] and not third.workloads
    # the directory changed while the control plane was down: a new version, counted from the stored one
    third.data.close()
    (config / "routes.yaml").write_text(split(50, 50))
    fourth = _store(config, data)
    assert fourth.version == "6" and _weights(fourth) == [50, 50]


def test_a_second_control_plane_cannot_share_the_directory(tmp_path):
    first = DataDirectory(tmp_path).open()
    with pytest.raises(StoreError, match=rf"data directory {tmp_path} is in use by another control plane \(pid \d+\)"):
        DataDirectory(tmp_path).open()
    first.close()
    DataDirectory(tmp_path).open().close()


def test_a_write_that_fails_refuses_the_change_and_keeps_the_state(tmp_path):
    config, data = tmp_path / "config", tmp_path / "data"
    write_mesh(config)
    store = _store(config, data)
    (data / "controlplane-state.msgpack").unlink()
    (data / "controlplane-state.msgpack").mkdir()  # rename(2) cannot replace a directory with a file
    with pytest.raises(ConfigError) as e:
        store.apply([("a.yaml", split(10, 90).encode())])
    assert str(e.value).startswith(f"{data}/controlplane-state.msgpack: cannot store the change: ")
    assert isinstance(e.value.__cause__, OSError)
    assert store.version == "1" and _weights(store) == [80, 20] and not store.applied
    assert not list(data.glob(".*.tmp"))


def test_a_corrupt_state_file_is_refused_by_name(tmp_path):
    (tmp_path / "controlplane-state.msgpack").write_bytes(b"\x01not msgpack")
    with pytest.raises(StoreError, match="controlplane-state.msgpack: not a control-plane state document"):
        DataDirectory(tmp_path).open().load()


WRITER = """
import sys
from pathlib import Path
from controlplane.durable import DataDirectory, PersistedResource, PersistedState

data = DataDirectory(Path(sys.argv[1])).open()
body = b"x" * 200_000  # big enough that a write takes a while
for generation in range(1, 100_000):
    data.commit(PersistedState(generation=generation, content_version=str(generation),
                               applied=[PersistedResource(body + str(generation).encode(), "f", generation)]))
    print(generation, flush=True)  # acknowledged only once committed
"""


def test_sigkill_during_commits_leaves_the_last_committed_state(tmp_path):
    """A writer killed at arbitrary moments: the file is always one whole committed state, never
    older than the last acknowledged commit."""
    for attempt in range(5):
        data = tmp_path / f"data-{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data)], cwd=REPO, stdout=subprocess.PIPE)
        acknowledged = 0
        deadline = time.monotonic() + 10
        while acknowledged < 3 + 7 * attempt and time.monotonic() < deadline:
            acknowledged = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        acknowledged = max([acknowledged, *(int(line) for line in proc.stdout.read().split())])
        proc.stdout.close()
        state = DataDirectory(data).open().load()
        assert isinstance(state, PersistedState)
        assert state.generation in (acknowledged, acknowledged + 1)  # + 1: renamed, not yet printed
        assert state.applied[0].body.endswith(str(state.generation).encode()) and state.applied[0].document == state.generation
        assert not list(data.glob(".*.tmp"))  # open() cleared the interrupted write's temporary file


async def test_restored_registrations_wait_the_grace_period_for_their_proxy(tmp_path, nursery):
    """After a restart a registered workload stays an endpoint while its proxy reconnects; one whose
    proxy does not come back within the grace period is removed."""
    import trio

    from cp_harness import Compiling, start_plane, wait_for
    from proxy.xds.client import NodeInfo, run_client

    config, data = tmp_path / "config", tmp_path / "data"
    write_mesh(config)
    first = _store(config, data)
    first.register_workload("comes-back", "tutorial", {"app": "recommendation", "version": "v3"}, "127.0.0.7",
                            {"http": 18085}, "")
    first.register_workload("gone", "tutorial", {"app": "recommendation", "version": "v3"}, "127.0.0.8",
                            {"http": 18085}, "")
    first.data.close()

    store = _store(config, data)  # the restarted control plane
    assert {k.name for k in store.workloads} == {"comes-back", "gone"}
    plane, port = await start_plane(nursery, store, grace_period_s=0.5)
    started = trio.current_time()
    assert plane.proxies["gone"].stream is None and plane.proxies["comes-back"].stream is None
    node = NodeInfo("comes-back", namespace="tutorial", labels={"app": "recommendation", "version": "v3"},
                    address="127.0.0.7", ports={"http": 18085}, register=True)
    await nursery.start(run_client, ("127.0.0.1", port), node, Compiling(dict(node.labels)))
    await wait_for(lambda: plane.proxies["comes-back"].stream is not None, what="reconnected")
    await wait_for(lambda: "gone" not in plane.proxies, what="the absent proxy expired")
    assert 0.45 <= trio.current_time() - started < 1.5
    assert {k.name for k in store.workloads} == {"comes-back"}
    await trio.sleep(0.6)  # past the grace period: the proxy that came back keeps its registration
    assert {k.name for k in store.workloads} == {"comes-back"}
    store.data.close()
    assert {k.name for k in _store(config, data).workloads} == {"comes-back"}  # and so does the data directory
