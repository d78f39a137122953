"""Traffic mirroring (VirtualService `mirror`/`mirrors`): a copy of the request, fire-and-forget.

The copy goes to the mirror cluster with `-shadow` appended to the host (before any port, as Envoy
does), on a task of its own (DataPlane.spawn), in the mirror cluster's protocol (HTTP/1.1, or a
stream on its HTTP/2 pool), and its response is read and thrown away. Nothing of
it can delay or fail the real request: the copy is made before the real request is sent, it never
awaits on the request's task, errors and timeouts are only counted. A request whose body was not
buffered (larger than the replay limit) is not mirrored; nor is one beyond the per-worker limit of
mirrors in flight (counted as dropped, never queued).
"""

from __future__ import annotations

import random
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from proxy.l7 import h1
from proxy.l7.body import BodyReader
from proxy.l7.errors import ConnectFailure, LocalConnectFailure, UpstreamProtocolError, UpstreamReset, UpstreamTimeout
from proxy.l7.events import split_authority
from proxy.l7.h1_client import read_response_head
from proxy.l7.h2_codec import request_fields
from proxy.l7.h2_upstream import open_stream
from proxy.l7.upstream_conn import acquire, release

if TYPE_CHECKING:
    from proxy.config.snapshot import MirrorPolicy
    from proxy.l7.chain import Chain
    from proxy.l7.context import RequestContext
    from proxy.l7.dataplane import ClusterRuntime, DataPlane

log = structlog.get_logger("triomesh.l7.mirror")

_PPM = 1_000_000
MIRROR_TIMEOUT_S = 15.0  # when the route sets no timeout (Envoy's default route timeout)


def shadow_authority(authority: bytes) -> bytes:
    """"host:port" -> "host-shadow:port"; "host" -> "host-shadow"."""
    host, port = split_authority(authority)
    return host + b"-shadow" if port is None else host + b"-shadow:" + port


def start_mirrors(plane: DataPlane, ctx: RequestContext, mirrors: tuple[MirrorPolicy, ...], body: bytes | None,
                  chain: Chain, rand_below=random.randrange) -> None:
    """Each copy carries the peer metadata its own cluster gets (Chain.upstream_peer_header), which
    need not be what the request's cluster gets: a copy to a MESH_EXTERNAL service gets none."""
    from proxy.l7.dataplane import MIRRORS_IN_FLIGHT_MAX

    # the data plane's current runtime: asking for the request's own snapshot after a swap would
    # rebuild the old one
    clusters = plane.current_clusters()
    head = ctx.request
    for m in mirrors:
        if m.ppm < _PPM and rand_below(_PPM) >= m.ppm:
            continue
        crt = clusters.get(m.cluster)
        if crt is None:
            continue
        if body is None or plane.mirrors_in_flight >= MIRRORS_IN_FLIGHT_MAX:
            crt.mirror_dropped.value += 1
            continue
        authority = shadow_authority(head.authority or crt.cluster.service_host.encode())
        peer_header = chain.upstream_peer_header(crt.cluster)
        if crt.cluster.http2:  # the cluster speaks HTTP/2 (a gRPC service): the copy goes as a stream
            send = partial(_send_h2, request_fields(head, authority, len(body) if body else None, peer_header), body)
        else:
            framing = h1.Framing(h1.LENGTH, len(body)) if body else h1.FRAMING_NONE
            peer_field = chain.peer_field if peer_header is not None else b""
            send = partial(_send_h1, head.method, h1.serialize_request_head(
                head.method, head.target, head.headers, framing, authority, peer_field) + body)
        timeout = ctx.route.timeout_s or MIRROR_TIMEOUT_S
        plane.mirrors_in_flight += 1
        crt.mirror_total.value += 1
        plane.spawn(_mirror, plane, crt, ctx, send, timeout)


async def _mirror(plane: DataPlane, crt: ClusterRuntime, ctx: RequestContext, send, timeout_s: float) -> None:
    """One copy: the endpoint pick, the bookkeeping and the failure accounting; `send` speaks the
    cluster's protocol and returns the response status once the whole response was read."""
    ok = False
    endpoint = None
    in_flight = plane.in_flight
    try:
        with trio.move_on_after(timeout_s):
            # the one endpoint pick (outlier ejections, hashing, least-request), like the request's own
            endpoint = crt.pick(ctx, plane.in_flight_of)
            if endpoint is None:
                return
            in_flight[endpoint.key] = in_flight.get(endpoint.key, 0) + 1
            status = await send(plane, crt, endpoint.key, plane.now() + timeout_s)
            crt.count_response(status)
            crt.record(endpoint, status)  # the mirror cluster's outlier detector hears of it too
            ok = True
    except Exception as e:  # a mirror's failure is counted, never raised
        log.debug("mirror failed", cluster=crt.name, error=str(e))
        if (endpoint is not None and isinstance(e, (ConnectFailure, UpstreamReset, UpstreamTimeout))
                and not isinstance(e, LocalConnectFailure)):  # no socket of ours: not the endpoint's fault
            crt.record(endpoint, 504 if isinstance(e, UpstreamTimeout) else 503, True)
    finally:
        plane.mirrors_in_flight -= 1
        if endpoint is not None:
            in_flight[endpoint.key] -= 1
        if not ok:
            crt.mirror_failed.value += 1


async def _send_h1(method: bytes, data: bytes, plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int],
                   deadline: float) -> int:
    up = None
    reusable = False
    try:
        up, _ = await acquire(plane, crt, key, deadline=deadline)
        await up.send_all(data)
        minor, status, _, headers = await read_response_head(
            up, deadline, plane.settings.max_head_bytes, plane.settings.max_headers)
        up.requests += 1
        _, framing, keep_alive, _, _ = h1.classify_response(method, status, minor, headers)
        reader = BodyReader(up, framing, eof_error=UpstreamReset, timeout_error=UpstreamTimeout,
                            protocol_error=UpstreamProtocolError, deadline=deadline)
        reader.buffered_pieces()
        while not reader.done:
            await reader.next_pieces()
        reusable = keep_alive  # False for a body that ends with the connection
        return status
    finally:
        if up is not None:
            release(plane, crt, up, reusable)


async def _send_h2(fields, body: bytes, plane: DataPlane, crt: ClusterRuntime, key: tuple[str, int],
                   deadline: float) -> int:
    up = await open_stream(plane, crt, key)
    try:
        up.connection.send_headers(up, fields, not body)
        if body:
            await up.send_body(body, True)
        else:
            up.connection.flush()
        status, _ = await up.read_head(deadline)
        up.buffered_pieces()
        while not up.done:
            await up.next_pieces(deadline)
        return status
    finally:
        up.close()  # resets the stream if the response is not complete, and gives its slot back
