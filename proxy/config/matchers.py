"""Istio HTTPMatchRequest blocks compiled into closures over RequestHead (run once per request).

Semantics, as Envoy applies the routes Istio generates:
- `uri` exact/prefix/regex match `head.path` (the path without the query); regex is a full match
  (RE2 `FullMatch`); `ignoreUriCase` makes exact/prefix case-insensitive (not regex, as in Istio).
- `headers` keys are header names (matched lowercase); several same-name headers are joined with ","
  before matching; an empty StringMatch (`{}`) tests presence. `withoutHeaders` negates, a missing
  header counting as "" (Istio sets treat_missing_header_as_empty), `{}` meaning "absent".
- `method`, `authority`, `scheme` match those head fields, case-sensitively.
- `queryParams` match the first occurrence of a key in the raw (not percent-decoded) query; "?key"
  has value "".
- Fields inside a block AND, blocks OR; no blocks matches everything.
Conditions fixed per listener (`port`, `gateways`, `sourceLabels`) are decided at compile time: a block
that can never match on this listener is dropped.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from proxy.config.istio import HTTPMatchRequest, StringMatch
from proxy.config.snapshot_transfer import rebuilt_by
from proxy.l7.events import RequestHead, split_authority

Predicate = Callable[[RequestHead], bool]
BytesMatch = Callable[[bytes], bool]


def _always(head: RequestHead) -> bool:
    return True


def _never(head: RequestHead) -> bool:
    return False


def always() -> Predicate:
    return _always


def compile_string_match(sm: StringMatch, *, ignore_case: bool = False) -> BytesMatch:
    """A bytes predicate for one StringMatch (an empty one matches anything)."""
    if sm.exact is not None:
        want = sm.exact.encode()
        if ignore_case:
            want = want.lower()
            return lambda v: v.lower() == want
        return lambda v: v == want
    if sm.prefix is not None:
        want = sm.prefix.encode()
        if ignore_case:
            want = want.lower()
            return lambda v: v.lower().startswith(want)
        return lambda v: v.startswith(want)
    if sm.regex is not None:
        fullmatch = re.compile(sm.regex.encode()).fullmatch
        return lambda v: fullmatch(v) is not None
    return lambda v: True


def _is_empty(sm: StringMatch) -> bool:
    return sm.exact is None and sm.prefix is None and sm.regex is None


def header_value(head: RequestHead, name: bytes) -> bytes | None:
    """All values of a (lowercase) header joined with ",", or None when absent."""
    found: bytes | None = None
    for n, v in head.headers:
        if n == name:
            found = v if found is None else found + b"," + v
    return found


# Header-map keys that name a request-line field rather than a header. Istio's doc says `uri`, `scheme`,
# `method`, `authority` keys are ignored; the h2 pseudo-header spellings and `host` (which Envoy folds
# into :authority) address the head fields directly.
_IGNORED_HEADER_KEYS = frozenset({"uri", "scheme", "method", "authority"})
_HEAD_FIELDS: dict[str, Callable[[RequestHead], bytes]] = {
    ":authority": lambda h: h.authority,
    "host": lambda h: h.authority,
    ":method": lambda h: h.method,
    ":scheme": lambda h: h.scheme,
    ":path": lambda h: h.target,
}


def _header_predicate(name: str, sm: StringMatch, *, negate: bool) -> Predicate | None:
    key = name.lower()
    if key in _IGNORED_HEADER_KEYS:
        return None
    match = compile_string_match(sm)
    empty = _is_empty(sm)
    field_of = _HEAD_FIELDS.get(key)
    if field_of is not None:
        get = field_of
        if negate:
            return lambda h: not match(get(h))
        return lambda h: match(get(h))
    bname = key.encode()
    if negate:
        if empty:
            return lambda h: header_value(h, bname) is None

        def without(h: RequestHead) -> bool:
            v = header_value(h, bname)
            return not match(b"" if v is None else v)

        return without
    if empty:
        return lambda h: header_value(h, bname) is not None

    def with_header(h: RequestHead) -> bool:
        v = header_value(h, bname)
        return v is not None and match(v)

    return with_header


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """Raw query parameters, first occurrence of a key wins (as Envoy's query matcher)."""
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if part:
            k, _, v = part.partition(b"=")
            params.setdefault(k, v)
    return params


def _query_predicate(params: Mapping[str, StringMatch]) -> Predicate:
    checks = [(k.encode(), compile_string_match(sm), _is_empty(sm)) for k, sm in params.items()]

    def query_match(h: RequestHead) -> bool:
        if not h.query:
            return False
        found = parse_query(h.query)
        for key, match, presence in checks:
            v = found.get(key)
            if v is None or (not presence and not match(v)):
                return False
        return True

    return query_match


def authority_port(head: RequestHead) -> int:
    """The port the client addressed: explicit in the authority, else the scheme's default."""
    port = split_authority(head.authority)[1]
    if port is not None:
        try:
            return int(port)
        except ValueError:
            pass
    return 443 if head.scheme == b"https" else 80


def all_of(preds: Sequence[Predicate]) -> Predicate:
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda h: a(h) and b(h)
    t = tuple(preds)

    def every(h: RequestHead) -> bool:
        for p in t:
            if not p(h):
                return False
        return True

    return every


def any_of(preds: Sequence[Predicate]) -> Predicate:
    if not preds:
        return _never
    if len(preds) == 1:
        return preds[0]
    t = tuple(preds)

    def some(h: RequestHead) -> bool:
        for p in t:
            if p(h):
                return True
        return False

    return some


class MatchContext:
    """What is fixed per listener: which gateway (or "mesh") the routes serve, the port (None on a
    sidecar egress listener, where the addressed port comes from the authority), the proxy's labels."""

    __slots__ = ("gateway", "port", "proxy_labels")

    def __init__(self, gateway: str, port: int | None, proxy_labels: Mapping[str, str] | None) -> None:
        self.gateway = gateway  # "ns/name" or "mesh"
        self.port = port
        self.proxy_labels = proxy_labels or {}


def compile_match_block(m: HTTPMatchRequest, ctx: MatchContext, resolve_gateway: Callable[[str], str]) -> Predicate | None:
    """One match block as a predicate, or None when it can never match in this context."""
    if m.gateways and ctx.gateway not in {resolve_gateway(g) for g in m.gateways}:
        return None
    if m.source_labels and any(ctx.proxy_labels.get(k) != v for k, v in m.source_labels.items()):
        return None
    if m.port is not None and ctx.port is not None and m.port != ctx.port:
        return None
    return block_predicate(m, port_from_authority=m.port is not None and ctx.port is None)


def block_predicate(m: HTTPMatchRequest, port_from_authority: bool) -> Predicate:
    """The per-request checks of a block that applies in its context; `port_from_authority`: its
    `port` is compared with the request's authority (a listener without a fixed port)."""
    preds: list[Predicate] = []
    if port_from_authority:
        want_port = m.port
        preds.append(lambda h: authority_port(h) == want_port)
    if m.uri is not None and not _is_empty(m.uri):
        uri = compile_string_match(m.uri, ignore_case=m.ignore_uri_case and m.uri.regex is None)
        preds.append(lambda h: uri(h.path))
    if m.method is not None and not _is_empty(m.method):
        method = compile_string_match(m.method)
        preds.append(lambda h: method(h.method))
    if m.authority is not None and not _is_empty(m.authority):
        authority = compile_string_match(m.authority)
        preds.append(lambda h: authority(h.authority))
    if m.scheme is not None and not _is_empty(m.scheme):
        scheme = compile_string_match(m.scheme)
        preds.append(lambda h: scheme(h.scheme))
    for name, sm in m.headers.items():
        p = _header_predicate(name, sm, negate=False)
        if p is not None:
            preds.append(p)
    for name, sm in m.without_headers.items():
        p = _header_predicate(name, sm, negate=True)
        if p is not None:
            preds.append(p)
    if m.query_params:
        preds.append(_query_predicate(m.query_params))
    # a worker handed the compiled snapshot rebuilds the closure from the block
    return rebuilt_by(all_of(preds), block_predicate, m, port_from_authority)


def compile_matches(
    blocks: Sequence[HTTPMatchRequest], ctx: MatchContext, resolve_gateway: Callable[[str], str]
) -> Predicate | None:
    """OR over blocks; None when every block is impossible in this context (the route is dropped)."""
    if not blocks:
        return _always
    preds = [p for p in (compile_match_block(m, ctx, resolve_gateway) for m in blocks) if p is not None]
    if not preds:
        return None
    if any(p is _always for p in preds):
        return _always
    return rebuilt_by(any_of(preds), any_of, preds)


# --------------------------------------------------------------------------------------------------
# VirtualService delegation: a root route's match blocks ANDed with a delegate route's


def _uri_within(root: StringMatch, sub: StringMatch) -> bool:
    """Whether every uri `sub` matches is also matched by `root` (Istio's delegate rule)."""
    if root == sub:
        return True
    if root.prefix is not None:
        inner = sub.exact if sub.exact is not None else sub.prefix
        return inner is not None and inner.startswith(root.prefix)
    return False


def _merge_block(root: HTTPMatchRequest, sub: HTTPMatchRequest) -> HTTPMatchRequest | None:
    fields: dict = {}
    for name in ("uri", "scheme", "method", "authority"):
        a, b = getattr(root, name), getattr(sub, name)
        if a is None or _is_empty(a):
            fields[name] = b
        elif b is None or _is_empty(b):
            fields[name] = a
        elif (name == "uri" and _uri_within(a, b)) or a == b:
            fields[name] = b
        else:
            return None
    if root.port is not None and sub.port is not None and root.port != sub.port:
        return None
    fields["port"] = sub.port if sub.port is not None else root.port
    for name in ("headers", "query_params", "without_headers", "source_labels"):
        merged = dict(getattr(root, name))
        for key, value in getattr(sub, name).items():
            if key in merged and merged[key] != value:
                return None
            merged[key] = value
        fields[name] = merged
    fields["gateways"] = root.gateways or sub.gateways
    fields["ignore_uri_case"] = root.ignore_uri_case or sub.ignore_uri_case
    fields["name"] = sub.name or root.name
    return HTTPMatchRequest(**fields)


def merge_matches(root: Sequence[HTTPMatchRequest], sub: Sequence[HTTPMatchRequest]) -> tuple[HTTPMatchRequest, ...] | None:
    """Every root block ANDed with every delegate block; None when all combinations contradict."""
    if not root:
        return tuple(sub)
    if not sub:
        return tuple(root)
    out = tuple(m for m in (_merge_block(a, b) for a in root for b in sub) if m is not None)
    return out or None
