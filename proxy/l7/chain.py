"""The explicit list of stages a request passes through, built once per snapshot.

A stage's `on_request(ctx)` is synchronous and either continues (returns None), answers locally
(raises a ProxyError, or returns a LocalResponse), or asks the chain to wait (returns a Delay; the
fault stage of a later issue uses that). Response stages run in reverse order on the response head
before it goes downstream. The terminal step, the upstream exchange, is not a stage: it lives in
`upstream.py` and is called by the server after the request stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config.snapshot import Cluster
    from proxy.l7.context import RequestContext
    from proxy.l7.events import ResponseHead


class LocalResponse:
    """A stage's own answer (directResponse, fault abort, ...)."""

    __slots__ = ("status", "body", "headers", "response_flag")

    def __init__(self, status: int, body: bytes = b"", headers: list | None = None, response_flag: str = "") -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.response_flag = response_flag


class Delay:
    __slots__ = ("seconds", "response_flag")

    def __init__(self, seconds: float, response_flag: str = "DI") -> None:
        self.seconds = seconds
        self.response_flag = response_flag


class Stage(Protocol):
    def on_request(self, ctx: RequestContext) -> LocalResponse | Delay | None: ...

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None: ...


class Chain:
    """`peer_header`: on an outbound listener with Istio's metrics on, the (name, value) of the peer
    metadata this proxy sends to mesh-internal clusters (stages/peer_metadata.py), else None. The
    upstream encoders add it after the request's own fields (the last copy is the one the server
    side believes), from `upstream_peer_header`; the HTTP/1.1 one writes `peer_field`, the same
    field serialised once per snapshot, so a request makes no header object for it."""

    __slots__ = ("request_stages", "response_stages", "plain_response_stages", "plain_field_taker", "plain_take",
                 "parses_response", "sole_taker", "peer_header", "peer_field")

    def __init__(self, stages: tuple[Stage, ...], peer_header: tuple[bytes, bytes] | None = None) -> None:
        self.peer_header = peer_header
        self.peer_field = peer_header[0] + b": " + peer_header[1] + b"\r\n" if peer_header is not None else b""
        # a stage whose has_request_step is False only acts on responses
        self.request_stages = tuple(s for s in stages if getattr(s, "has_request_step", True))
        # only stages that override on_response take part on the way back, in reverse order
        self.response_stages = tuple(s for s in reversed(stages) if getattr(s, "has_response_step", False))
        # response stages that can also edit a plain response's forwarded field block (bytes) keep
        # the router's plain relay (router.Exchange.plain_relay); any other one needs parsed headers
        self.plain_response_stages = tuple(s for s in self.response_stages if getattr(s, "edits_plain_fields", False))
        # a response stage that only reads one field of a plain response (`takes_plain_field`, its
        # lowercase name) has the head parser take it out of the block while it sorts the fields, and
        # is called (on_taken_field) only when the field was there: at most one per chain
        takers = [s for s in self.response_stages if getattr(s, "takes_plain_field", b"")]
        assert len(takers) <= 1, "one stage at most may take a field out of a plain response"
        self.plain_field_taker = takers[0] if takers else None
        self.plain_take: bytes = takers[0].takes_plain_field if takers else b""
        self.parses_response = len(self.plain_response_stages) + len(takers) != len(self.response_stages)
        # the taker when it is the only response stage: an HTTP/2 upstream response then has the field
        # taken out of its fields once per repeated header block (h2_upstream.ResponseView), and the
        # stage is called (on_taken_field) only when the field was there, as for a plain response
        self.sole_taker = self.plain_field_taker if self.response_stages == tuple(takers) and takers else None

    def upstream_peer_header(self, cluster: Cluster | None) -> tuple[bytes, bytes] | None:
        """The peer header a request to `cluster` carries: ours, to a mesh-internal cluster only."""
        peer_header = self.peer_header
        if peer_header is not None and cluster is not None and cluster.mesh_internal:
            return peer_header
        return None

    def run_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        for stage in self.response_stages:
            stage.on_response(ctx, head)
