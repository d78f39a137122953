"""Response header operations of the route and of the chosen destination (VirtualService
`headers.response`), plus the Set-Cookie of a generated consistent-hash cookie and the CORS headers
for an allowed origin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.l7.context import RequestContext
    from proxy.l7.events import ResponseHead


def response_header_ops(ctx: RequestContext, headers: list) -> list:
    """`headers` with the route's and the destination's response operations applied."""
    route = ctx.route
    if route is not None and route.response_headers is not None:
        headers = route.response_headers.apply(headers)
    extra = ctx.extra
    if extra:
        dest = extra.get("destination")
        if dest is not None and dest.response_headers is not None:
            headers = dest.response_headers.apply(headers)
        cookie = extra.get("set_cookie")
        if cookie is not None:
            headers.append((b"set-cookie", cookie))
        cors = extra.get("cors_headers")
        if cors is not None:
            headers = [h for h in headers if not h[0].startswith(b"access-control-")] + cors
    return headers


class ResponseHeadersStage:
    has_response_step = True
    __slots__ = ()

    def on_request(self, ctx: RequestContext) -> None:
        return None

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        head.headers = response_header_ops(ctx, head.headers)
