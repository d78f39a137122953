"""Fault injection (VirtualService `fault`): delay, then abort, before any upstream is contacted,
as Envoy's fault filter does. Response flags DI (delay injected) and FI (fault injected)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from proxy.l7.chain import Delay, LocalResponse

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext

_PPM = 1_000_000
ABORT_BODY = b"fault filter abort"


class FaultDelayStage:
    has_response_step = False
    __slots__ = ("clusters", "rand_below")

    def __init__(self, clusters, rand_below=random.randrange) -> None:
        self.clusters = clusters  # name -> ClusterRuntime, for the per-cluster counters
        self.rand_below = rand_below

    def on_request(self, ctx: RequestContext) -> Delay | None:
        fault = ctx.route.fault
        if fault is None or not fault.delay_ppm:
            return None
        if fault.delay_ppm < _PPM and self.rand_below(_PPM) >= fault.delay_ppm:
            return None
        crt = self.clusters.get(ctx.cluster.name)
        if crt is not None:
            crt.fault_delays.value += 1
        return Delay(fault.delay_s, "DI")


class FaultAbortStage:
    has_response_step = False
    __slots__ = ("clusters", "rand_below")

    def __init__(self, clusters, rand_below=random.randrange) -> None:
        self.clusters = clusters
        self.rand_below = rand_below

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        fault = ctx.route.fault
        if fault is None or not fault.abort_ppm:
            return None
        if fault.abort_ppm < _PPM and self.rand_below(_PPM) >= fault.abort_ppm:
            return None
        crt = self.clusters.get(ctx.cluster.name)
        if crt is not None:
            crt.fault_aborts.value += 1
        if fault.abort_grpc_status is not None:
            # a gRPC error is an HTTP 200 with grpc-status, as Envoy's fault filter answers gRPC
            return LocalResponse(200, b"", [(b"content-type", b"application/grpc"),
                                            (b"grpc-status", b"%d" % fault.abort_grpc_status),
                                            (b"grpc-message", ABORT_BODY)], response_flag="FI")
        return LocalResponse(fault.abort_status, ABORT_BODY, response_flag="FI")
