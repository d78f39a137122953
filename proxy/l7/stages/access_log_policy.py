"""The Telemetry `accessLogging` choice of a listener's side (client or server), handed to the end of
the request: built into a chain only when a Telemetry resource changes access logging there, so a
proxy without one pays nothing per request."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config.telemetry import AccessLogChoice
    from proxy.l7.context import RequestContext


class AccessLogPolicyStage:
    has_response_step = False
    __slots__ = ("choice",)

    def __init__(self, choice: AccessLogChoice) -> None:
        self.choice = choice

    def on_request(self, ctx: RequestContext) -> None:
        ctx.scratch()["access_log"] = self.choice  # read by pipeline.finish through access_log.emit_chosen
        return None
