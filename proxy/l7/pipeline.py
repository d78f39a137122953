"""One request's way through the data path once its stream exists, the same for every protocol:
request stages, the router, errors turned into replies, stats and the access log at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from proxy.l7.chain import Delay
from proxy.l7.errors import BadRequest, DownstreamDisconnect, ProxyError
from proxy.l7.h2_client import H2Exchange
from proxy.l7.router import Exchange

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext
    from proxy.l7.dataplane import ClusterRuntime, DataPlane
    from proxy.l7.stream import DownstreamStream

log = structlog.get_logger("triomesh.l7")


async def serve_request(plane: DataPlane, ctx: RequestContext, stream: DownstreamStream,
                        clusters: dict[str, ClusterRuntime]) -> bool:
    """Run the request on `stream`; returns whether its connection may serve another request."""
    try:
        for stage in stream.chain.request_stages:
            outcome = stage.on_request(ctx)
            if outcome is not None:
                if isinstance(outcome, Delay):
                    ctx.response_flags.append(outcome.response_flag)
                    await trio.sleep(outcome.seconds)
                else:
                    if outcome.response_flag:
                        ctx.response_flags.append(outcome.response_flag)
                    return await stream.send_local(ctx, outcome.status, outcome.body, outcome.headers,
                                                   generated=True)
        crt = clusters[ctx.cluster.name]
        return await (H2Exchange if crt.http2 else Exchange)(ctx, plane, crt, stream).run()
    except ProxyError as e:
        ctx.error = e
        return await reply_for_error(ctx, e, stream)
    finally:
        finish(plane, ctx)


def finish(plane: DataPlane, ctx: RequestContext) -> None:
    """Stats and the access log line of a request that ended, however it ended."""
    if ctx.status or ctx.response_flags:
        plane.count_downstream(ctx.status, ctx.response_flags)
        # Istio's metrics: one native call counts a request like one seen before; the first of its
        # kind, and those with response flags or gRPC facts, take the general path. The bound
        # method is kept on the plane (None with metrics off), so this costs a few bytecodes
        record_known = plane.record_known
        if record_known is not None:
            try:
                if not record_known(ctx):
                    plane.telemetry.record_request(ctx)
            except Exception:  # noqa: BLE001 - a metrics bug must not cost the request its access log or connection
                log.exception("istio metrics failed", client=ctx.downstream_addr)
    extra = ctx.extra
    if extra is not None:
        if "grpc_status" in extra:
            plane.count_grpc(extra["grpc_status"])
        if "trace" in extra:  # a sampled request's spans (stages/tracing.py)
            plane.tracing.record(ctx, extra["trace"])
    access_log = plane.access_log
    if access_log is not None:
        if extra is not None and "access_log" in extra:  # a Telemetry accessLogging choice (stages/access_log_policy.py)
            access_log.emit_chosen(extra["access_log"], ctx)
        else:
            access_log.emit(ctx)


async def reply_for_error(ctx: RequestContext, e: ProxyError, stream: DownstreamStream) -> bool:
    """The one place errors become replies: before a response head went out, a local reply;
    after it, a reset of the stream; to a dead or timed-out downstream, nothing."""
    if e.response_flag != "-":
        ctx.response_flags.append(e.response_flag)
    if ctx.response is not None or not e.status:
        if ctx.response is not None and not isinstance(e, DownstreamDisconnect):
            log.info("upstream failed mid-response, resetting downstream", client=ctx.downstream_addr,
                     upstream=ctx.upstream_host, error=str(e))
        stream.reset()
        return False
    if isinstance(e, BadRequest):
        stream.keep_alive = False  # what follows a malformed request cannot be trusted
    if e.source == "upstream":
        log.info("upstream error", client=ctx.downstream_addr, upstream=ctx.upstream_host, flag=e.response_flag,
                 error=str(e))
    return await stream.send_local(ctx, e.status, e.body, list(e.headers), generated=True)
