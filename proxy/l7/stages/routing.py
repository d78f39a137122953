"""Route stage: listener route table → virtual host → first matching route → weighted destination,
then the route's request-side actions: uri/authority rewrite and request header operations."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from proxy.config.snapshot import Cluster
from proxy.l7.chain import LocalResponse
from proxy.l7.errors import NoCluster, NoRoute
from proxy.l7.events import split_authority

if TYPE_CHECKING:
    from proxy.config.snapshot import CorsPolicy, HeaderOps, Listener, Redirect, Rewrite, Snapshot
    from proxy.l7.context import RequestContext
    from proxy.l7.events import RequestHead

# the cluster of directResponse and redirect routes: the exchange answers them without an upstream
LOCAL_CLUSTER = Cluster(name="-", service_host="", port=0, subset="", endpoints=())


def apply_rewrite(head: RequestHead, rw: Rewrite) -> None:
    """Istio's rewrite: `uri` replaces the matched prefix (prefix matches) or the whole path
    (others); `uriRegexRewrite` substitutes every match in the path; the query is kept."""
    if rw.uri is not None:
        path = head.path
        if rw.prefix is not None and path.startswith(rw.prefix):
            new = rw.uri + path[len(rw.prefix):]
        else:
            new = rw.uri
        if not new.startswith(b"/"):
            new = b"/" + new
        head.set_target(new + b"?" + head.query if head.query else new)
    elif rw.regex is not None:
        new = rw.regex.sub(rw.substitution, head.path)
        head.set_target(new + b"?" + head.query if head.query else new)
    if rw.authority is not None:
        head.authority = rw.authority


def apply_request_headers(head: RequestHead, ops: HeaderOps) -> None:
    head.headers = ops.apply(head.headers)
    if ops.authority is not None:
        head.authority = ops.authority


def redirect_location(head: RequestHead, rd: Redirect) -> bytes:
    """The Location of an Istio redirect: scheme/authority/port/path each replaced when configured;
    the request's query is kept unless the redirect uri has its own; default ports are left out."""
    scheme = rd.scheme or head.scheme
    host, port = split_authority(rd.authority if rd.authority is not None else head.authority)
    if rd.port is not None:
        port = b"%d" % rd.port
    elif rd.derive_port == "FROM_PROTOCOL_DEFAULT":
        port = None
    elif rd.derive_port == "FROM_REQUEST_PORT":
        port = split_authority(head.authority)[1] or port
    if port is not None and ((scheme == b"http" and port == b"80") or (scheme == b"https" and port == b"443")):
        port = None
    if rd.uri is not None:
        path, sep, query = rd.uri.partition(b"?")
        if not sep:
            query = head.query
    else:
        path, query = head.path, head.query
    location = scheme + b"://" + host + (b":" + port if port else b"") + path
    return location + b"?" + query if query else location


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
        if route.plain:
            dest = route.pick_destination(self.rand_below)
            cluster = self.clusters.get(dest.cluster)
            if cluster is None:
                raise NoCluster(f"route {route.name} names unknown cluster {dest.cluster}")
            ctx.cluster = cluster
            return None
        if route.cors is not None:
            preflight = self._cors(ctx, route.cors, head)
            if preflight is not None:
                return preflight
        if not route.destinations:  # directResponse / redirect
            ctx.cluster = LOCAL_CLUSTER
            return None
        dest = route.pick_destination(self.rand_below)
        cluster = self.clusters.get(dest.cluster)
        if cluster is None:
            raise NoCluster(f"route {route.name} names unknown cluster {dest.cluster}")
        ctx.cluster = cluster
        if route.rewrite is not None:
            apply_rewrite(head, route.rewrite)
        if route.request_headers is not None:
            apply_request_headers(head, route.request_headers)
        if route.destination_headers:
            ctx.scratch()["destination"] = dest
            if dest.request_headers is not None:
                apply_request_headers(head, dest.request_headers)
        return None

    @staticmethod
    def _cors(ctx: RequestContext, cors: CorsPolicy, head: RequestHead) -> LocalResponse | None:
        """Envoy's CORS filter: an allowed origin's preflight is answered here; its actual requests
        get the CORS response headers. A preflight from another origin is forwarded, or answered
        200 without CORS headers when unmatchedPreflights is IGNORE."""
        origin = head.get(b"origin")
        if origin is None:
            return None
        allowed = cors.origin_allowed(origin)
        if head.method == b"OPTIONS" and head.get(b"access-control-request-method") is not None:
            if allowed:
                return LocalResponse(200, b"", [(b"access-control-allow-origin", origin), *cors.preflight_headers])
            if not cors.forward_unmatched_preflights:
                return LocalResponse(200, b"")
            return None
        if allowed:
            ctx.scratch()["cors_headers"] = [(b"access-control-allow-origin", origin), *cors.response_headers]
        return None
