"""What one worker's HTTP data path shares across connections: snapshot holder, stats, access log,
upstream pools, and the per-snapshot derived state (stage chains, balancers), rebuilt on a swap."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.l7.chain import Chain
from proxy.l7.stages.forwarding import ForwardingStage
from proxy.l7.stages.routing import RouteStage
from proxy.l7.timeouts import TimeoutSweeper
from proxy.lb.balancers import make_balancer
from proxy.lb.pool import IdlePool
from proxy.stats import Counter, Gauge, Stats

if TYPE_CHECKING:
    from proxy.config.snapshot import Cluster, Listener, Snapshot
    from proxy.runtime import SnapshotHolder


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Connection-manager limits and timeouts (Envoy's names in the comments)."""

    max_head_bytes: int = 60 * 1024  # max_request_headers_kb = 60
    max_headers: int = 100  # max_headers_count
    request_headers_timeout_s: float = 10.0  # request_headers_timeout
    idle_timeout_s: float = 300.0  # common_http_protocol_options.idle_timeout (downstream)
    stream_idle_timeout_s: float = 300.0  # stream_idle_timeout: no body byte either way for this long
    # route timeout when the VirtualService sets none: 0 disables it, as Istio configures Envoy
    # ("timeout ... default is disabled"), rather than Envoy's own 15 s
    route_timeout_s: float = 0.0
    connect_timeout_s: float = 10.0  # cluster connect_timeout when the config sets none
    upstream_idle_timeout_s: float = 60.0  # pooled idle upstream connections are closed after this
    max_idle_per_endpoint: int = 1024


class ClusterRuntime:
    """A cluster's mutable companions for one snapshot: its balancer and stats handles."""

    __slots__ = ("cluster", "balancer", "cx_total", "cx_active", "cx_connect_fail", "rq_by_code", "stats",
                 "name")

    def __init__(self, cluster: Cluster, stats: Stats) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.balancer = make_balancer(cluster.lb_policy, cluster.endpoints, random.randrange)
        self.stats = stats
        self.cx_total = stats.counter("triomesh_upstream_cx_total", cluster=cluster.name)
        self.cx_active = stats.gauge("triomesh_upstream_cx_active", cluster=cluster.name)
        self.cx_connect_fail = stats.counter("triomesh_upstream_cx_connect_fail_total", cluster=cluster.name)
        self.rq_by_code: dict[int, Counter] = {}

    def count_response(self, status: int) -> None:
        c = self.rq_by_code.get(status)
        if c is None:
            c = self.rq_by_code[status] = self.stats.counter(
                "triomesh_upstream_rq_total", cluster=self.name, response_code=str(status))
        c.value += 1


class SnapshotRuntime:
    """Derived, per-snapshot lookups: listeners by name, one chain per listener, cluster runtimes."""

    __slots__ = ("snapshot", "listeners", "chains", "clusters", "stats")

    def __init__(self, snapshot: Snapshot, stats: Stats, previous: SnapshotRuntime | None) -> None:
        self.snapshot = snapshot
        self.stats = stats
        self.listeners: dict[str, Listener] = {l.name: l for l in snapshot.listeners}
        self.chains: dict[str, Chain] = {
            l.name: Chain((RouteStage(snapshot, l), ForwardingStage())) for l in snapshot.listeners
        }
        # keep balancer positions for clusters whose definition did not change
        old = previous.clusters if previous is not None else {}
        self.clusters: dict[str, ClusterRuntime] = {}
        for name, cluster in snapshot.clusters.items():
            prev = old.get(name)
            self.clusters[name] = prev if prev is not None and prev.cluster == cluster else ClusterRuntime(cluster, stats)


class DataPlane:
    def __init__(self, holder: SnapshotHolder, stats: Stats, access_log: Any = None,
                 settings: HttpSettings | None = None) -> None:
        self.holder = holder
        self.stats = stats
        self.access_log = access_log if access_log is not None and getattr(access_log, "enabled", False) else None
        self.settings = settings or HttpSettings()
        self._runtime: SnapshotRuntime | None = None
        # idle upstream connections by (cluster name, address, port); they outlive snapshots
        self.pools: dict[tuple[str, str, int], IdlePool] = {}
        self.in_flight: dict[tuple[str, int], int] = {}
        s = self.settings
        self.sweeper = TimeoutSweeper(min(s.idle_timeout_s, s.request_headers_timeout_s))
        self.downstream_cx_total = stats.counter("triomesh_downstream_cx_total")
        self.downstream_cx_active = stats.gauge("triomesh_downstream_cx_active")
        self._rq_by_code: dict[int, Counter] = {}
        self._by_flag: dict[str, Counter] = {}

    def runtime(self, snapshot: Snapshot) -> SnapshotRuntime:
        rt = self._runtime
        if rt is None or rt.snapshot is not snapshot:
            rt = self._runtime = SnapshotRuntime(snapshot, self.stats, rt)
        return rt

    def pool(self, key: tuple[str, str, int]) -> IdlePool:
        pool = self.pools.get(key)
        if pool is None:
            s = self.settings
            pool = self.pools[key] = IdlePool(max_idle=s.max_idle_per_endpoint, idle_timeout_s=s.upstream_idle_timeout_s)
        return pool

    def count_downstream(self, status: int, flags: list[str]) -> None:
        c = self._rq_by_code.get(status)
        if c is None:
            c = self._rq_by_code[status] = self.stats.counter("triomesh_downstream_rq_total", response_code=str(status))
        c.value += 1
        for flag in flags:
            f = self._by_flag.get(flag)
            if f is None:
                f = self._by_flag[flag] = self.stats.counter("triomesh_response_flags_total", flag=flag)
            f.value += 1

    def gauge(self, name: str, **labels: str) -> Gauge:
        return self.stats.gauge(name, **labels)
