"""The RequestTable that counts Istio's request metrics: the native and pure versions agree count for
count (differentially, on the same requests), buckets follow bisect at every bound, slot indices are
bounds-checked, the fast path counts only what it may, and /stats/prometheus is the same text with
either one."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from bisect import bisect_left

import pytest

from proxy.l7.context import RequestContext
from proxy.l7.events import RequestHead
from proxy.stats import Stats, merge, render_prometheus
from proxy.telemetry import _request_metrics_c as native
from proxy.telemetry import _request_table_py as pure
from proxy.telemetry import istio_metrics
from proxy.telemetry.buckets import DEFAULT_BUCKETS
from proxy.telemetry.grpc_messages import GrpcMessageCounter
from proxy.telemetry.istio_metrics import IstioMetrics, PeerFacts
from proxy.telemetry.peer import identity_from_labels
from proxy.telemetry.request_table import DURATION, REQUEST_BYTES, RESPONSE_BYTES
from tests.config.helpers import compile_docs, doc

TABLES = [pytest.param(native.RequestTable, id="native"), pytest.param(pure.RequestTable, id="pure")]

MESH = [
    doc("ServiceEntry", "preference", {"hosts": ["preference"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                       "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                                       "endpoints": [{"address": "10.0.0.2", "labels": {"app": "preference"}},
                                                     {"address": "10.0.0.3", "labels": {"app": "preference",
                                                                                        "version": "v2"}}]},
        namespace="tutorial"),
]
CLIENT = identity_from_labels("tutorial", {"app": "customer", "version": "v1"}, "customer-v1")


class Clock:
    """A clock the test moves: what the table reads at the end of each request."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _context(snapshot, status: int = 200, endpoint_index: int = 0, start: float = 100.0) -> RequestContext:
    cluster = snapshot.clusters["outbound|8080||preference"]
    ctx = RequestContext(snapshot, None, "127.0.0.1:40000", RequestHead(b"GET", b"/", b"preference", []), start, 0.0)
    ctx.cluster, ctx.endpoint = cluster, cluster.endpoints[endpoint_index]
    ctx.upstream_host, ctx.status = ctx.endpoint.host_port, status
    return ctx


def test_native_bounds_are_envoys_default_buckets() -> None:
    assert native.BOUNDS == DEFAULT_BUCKETS and native.BUCKETS == pure.BUCKETS == len(DEFAULT_BUCKETS) + 1


@pytest.mark.parametrize("table_type", TABLES)
def test_buckets_follow_bisect_at_every_bound_and_at_the_table_edges(table_type) -> None:
    durations_ms = [0.0, 1e-9, -1.0, -1e-9, 999.999999, 1000.0, 1000.0000001, 7e6, math.inf, math.nan]
    sizes = [0, 1, 4095, 4096, 4097, 10**12, 2**63 - 1]
    for bound in DEFAULT_BUCKETS:
        durations_ms += [bound, bound - 1e-9, bound + 1e-9]
        sizes += [n for n in (int(bound) - 1, int(bound), int(bound) + 1) if n >= 0]
    durations_ms += [i / 7 for i in range(7 * 1000)]
    clock = Clock()
    table = table_type(len(durations_ms) + len(sizes), 1, RequestContext)
    table.set_clock(0.0, clock)
    for slot, duration in enumerate(durations_ms):
        clock.now = duration / 1000.0  # start 0.0: the duration is now * 1000
        table.record(slot, 0.0, 0, 0)
        counts, total = table.histogram(slot, DURATION)
        expected = bisect_left(DEFAULT_BUCKETS, (clock.now - 0.0) * 1000.0)
        assert counts.index(1) == expected and sum(counts) == 1, duration
        assert total == (clock.now - 0.0) * 1000.0 or (math.isnan(total) and math.isnan(duration))
    for slot, size in enumerate(sizes, start=len(durations_ms)):
        table.record(slot, 0.0, size, size)
        for which in (REQUEST_BYTES, RESPONSE_BYTES):
            counts, total = table.histogram(slot, which)
            assert counts.index(1) == bisect_left(DEFAULT_BUCKETS, size) and total == float(size), size


def test_native_and_pure_count_the_same_requests_alike() -> None:
    """Differential: random requests into both tables, through the general path (record) and the
    fast path (remember, then record_known) alike; every histogram and message count agrees."""
    snapshot = compile_docs(*MESH)
    generator = random.Random(12)
    clocks = {"native": Clock(), "pure": Clock()}
    tables = {"native": native.RequestTable(8, 64, RequestContext), "pure": pure.RequestTable(8, 64, RequestContext)}
    for name, table in tables.items():
        table.set_clock(0.5, clocks[name])
        table.forget(snapshot)
    for _ in range(3000):
        now = 100.0 + generator.choice([0.0, 0.0004, 0.003, 0.2, 1.5, 400.0, 5000.0])
        start = 100.0 + generator.random() / 1000.0
        received = generator.choice([0, 0, 1, 612, 4095, 4096, 70000, 2**40])
        sent = generator.choice([0, 17, 999, 1000, 1001, 2**20])
        status = generator.choice([200, 200, 404, 503])
        endpoint_index = generator.randrange(2)
        slot = generator.randrange(8)
        messages = (generator.randrange(5), generator.randrange(5)) if generator.random() < 0.2 else ()
        fast = generator.random() < 0.5
        results = []
        for name, table in tables.items():
            clocks[name].now = now
            ctx = _context(snapshot, status, endpoint_index, start)
            ctx.bytes_received, ctx.bytes_sent = received, sent
            if fast:
                if not table.record_known(ctx):
                    table.record(slot, start, received, sent)
                    assert table.remember(ctx, slot)
                results.append(table.remembered)
            else:
                table.record(slot, start, received, sent, *messages)
        assert len(set(results)) <= 1
    for slot in range(8):
        for which in (DURATION, REQUEST_BYTES, RESPONSE_BYTES):
            assert tables["native"].histogram(slot, which) == tables["pure"].histogram(slot, which), (slot, which)
        assert tables["native"].messages(slot) == tables["pure"].messages(slot)
    assert sum(sum(tables["pure"].histogram(slot, DURATION)[0]) for slot in range(8)) == 3000


@pytest.mark.parametrize("table_type", TABLES)
def test_slots_are_bounds_checked(table_type) -> None:
    """A slot number from anywhere (e.g. a series of an older snapshot, or a bug) never reaches
    memory outside the table: every call checks it."""
    snapshot = compile_docs(*MESH)
    table = table_type(4, 4, RequestContext)
    table.set_clock(0.0, lambda: 1.0)
    table.forget(snapshot)
    for slot in (-1, 4, 2**40):
        with pytest.raises(IndexError):
            table.record(slot, 0.0, 0, 0)
        with pytest.raises(IndexError):
            table.histogram(slot, DURATION)
        with pytest.raises(IndexError):
            table.messages(slot)
        with pytest.raises(IndexError):
            table.remember(_context(snapshot), slot)
    with pytest.raises(IndexError):
        table.histogram(0, 3)
    with pytest.raises(OverflowError):
        table.record(2**70, 0.0, 0, 0)
    with pytest.raises(ValueError):
        table.record(0, 0.0, -1, 0)
    table.record(3, 0.0, 0, 0)
    assert sum(table.histogram(3, DURATION)[0]) == 1 and table.capacity == 4


@pytest.mark.parametrize("table_type", TABLES)
def test_the_fast_path_counts_only_remembered_keys_of_the_current_snapshot(table_type) -> None:
    snapshot, other = compile_docs(*MESH), compile_docs(*MESH)
    table = table_type(4, 2, RequestContext)
    ctx = _context(snapshot)
    table.forget(snapshot)
    assert not table.remember(ctx, 0)  # no clock yet: nothing is counted on the fast path
    table.set_clock(0.0, lambda: 100.001)
    assert not table.record_known(ctx)  # not remembered yet
    assert table.remember(ctx, 1) and table.remembered == 1
    assert table.record_known(_context(snapshot))  # the same key: same objects, same status
    assert not table.record_known(_context(snapshot, status=404))
    assert not table.record_known(_context(snapshot, endpoint_index=1))
    flagged = _context(snapshot)
    flagged.response_flags.append("UF")
    assert not table.remember(flagged, 2) and not table.record_known(flagged)
    grpc = _context(snapshot)
    grpc.scratch()["grpc_status"] = b"0"
    assert not table.remember(grpc, 2) and not table.record_known(grpc)
    traced = _context(snapshot)
    traced.scratch()["trace"] = object()  # facts that decide no label: the same key as without them
    assert table.record_known(traced)
    peer = PeerFacts(CLIENT)
    with_peer = _context(snapshot)
    with_peer.scratch()["peer"] = peer
    assert not table.record_known(with_peer)  # peer facts are part of the key
    assert table.remember(with_peer, 2)
    again = _context(snapshot)
    again.scratch()["peer"] = peer
    assert table.record_known(again)
    # the key table is full (max_keys 2): more keys are not remembered, the general path counts them
    assert not table.remember(_context(snapshot, status=500), 3) and table.remembered == 2
    # a request of another snapshot is not counted until the table is told of it, which forgets all
    assert not table.record_known(_context(other))
    table.forget(other)
    assert table.remembered == 0 and not table.record_known(_context(snapshot))

    class OtherContext(RequestContext):
        __slots__ = ()

    subclassed = OtherContext(snapshot, None, "127.0.0.1:1", RequestHead(b"GET", b"/", b"x", []), 100.0, 0.0)
    assert not table.remember(subclassed, 0)
    assert sum(table.histogram(1, DURATION)[0]) == 2 and sum(table.histogram(2, DURATION)[0]) == 1
    counts, total = table.histogram(1, DURATION)
    assert math.isclose(total, 2.0) and counts[bisect_left(DEFAULT_BUCKETS, total / 2)] == 2


def test_native_table_refuses_a_context_type_without_slots() -> None:
    class Loose:
        pass

    with pytest.raises(TypeError, match="not a __slots__ field"):
        native.RequestTable(1, 1, Loose)
    with pytest.raises(ValueError):
        native.RequestTable(0, 1, RequestContext)


def _traffic(metrics: IstioMetrics, snapshot, clock: Clock) -> str:
    """The same requests for each table: known and new keys, peer facts, flags, gRPC, a new snapshot."""
    stats = metrics.stats
    second = compile_docs(*MESH)
    peer = PeerFacts(CLIENT)
    for index in range(40):
        current = snapshot if index < 30 else second
        clock.now = 100.0 + index * 0.0007
        ctx = _context(current, status=(200, 404)[index % 2], endpoint_index=index % 3 % 2, start=100.0)
        ctx.bytes_received, ctx.bytes_sent = index * 100, 612
        if index % 5 == 0:
            ctx.scratch()["peer"] = peer
        if index % 7 == 0:
            ctx.response_flags.append("URX")
        if index % 11 == 0:
            counters = (GrpcMessageCounter(), GrpcMessageCounter())
            counters[0].messages, counters[1].messages = 2, 3
            ctx.scratch().update(grpc_status=b"0", grpc_messages=counters)
        if not metrics.record_known(ctx):
            metrics.record_request(ctx)
    return render_prometheus(merge([stats.export()]))


def test_prometheus_text_is_the_same_with_either_table(monkeypatch) -> None:
    snapshot = compile_docs(*MESH)
    texts = {}
    for name, table_type in (("native", native.RequestTable), ("pure", pure.RequestTable)):
        monkeypatch.setattr(istio_metrics, "RequestTable", table_type)
        clock = Clock()
        metrics = IstioMetrics(Stats(), CLIENT, clock=clock)
        assert isinstance(metrics.table, table_type)
        texts[name] = _traffic(metrics, snapshot, clock)
    assert texts["native"] == texts["pure"]
    assert 'istio_requests_total{reporter="source"' in texts["native"]
    assert "istio_request_messages_total{" in texts["native"] and 'response_flags="URX"' in texts["native"]
    total = sum(int(line.rsplit(" ", 1)[1]) for line in texts["native"].splitlines()
                if line.startswith("istio_requests_total{"))
    assert total == 40


def test_default_import_is_native_unless_forced() -> None:
    from proxy.telemetry import request_table

    if os.environ.get("TRIOMESH_PURE_METRICS", "") not in ("", "0"):
        assert request_table.IMPLEMENTATION == "pure"
    else:
        # Fails when the extension was not built: `pip install -e .` must build it.
        assert request_table.IMPLEMENTATION == "native"
        assert request_table.RequestTable is native.RequestTable


def test_environment_variable_forces_pure() -> None:
    code = "from proxy.telemetry import request_table as t; print(t.IMPLEMENTATION, t.RequestTable.__module__)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRIOMESH_PURE_METRICS="1"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pure", "proxy.telemetry._request_table_py"]
