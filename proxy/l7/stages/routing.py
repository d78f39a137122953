"""Route stage: listener route table → virtual host → first matching route → weighted cluster."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from proxy.l7.errors import NoCluster, NoRoute

if TYPE_CHECKING:
    from proxy.config.snapshot import Listener, Snapshot
    from proxy.l7.context import RequestContext


class RouteStage:
    has_response_step = False
    __slots__ = ("listener", "clusters", "rand_below")

    def __init__(self, snapshot: Snapshot, listener: Listener, rand_below=random.randrange) -> None:
        self.listener = listener
        self.clusters = snapshot.clusters
        self.rand_below = rand_below

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.request
        vhost = self.listener.route_table.virtual_host_for(head.authority)
        if vhost is None:
            raise NoRoute(f"no virtual host for authority {head.authority[:100]!r}")
        route = vhost.route_for(head)
        if route is None:
            raise NoRoute(f"no route in {vhost.name} for {head.method.decode()} {head.path[:100]!r}")
        ctx.route = route
        name = route.pick_cluster(self.rand_below)
        cluster = self.clusters.get(name)
        if cluster is None:
            raise NoCluster(f"route {route.name} names unknown cluster {name}")
        ctx.cluster = cluster
        return None
