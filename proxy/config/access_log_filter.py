"""Telemetry `accessLogging[].filter.expression`: the part of CEL users write to pick which requests
get an access-log line, compiled once into a predicate over a request (pure).

Istio hands the expression to Envoy's CEL filter. We take the common forms: comparisons of
`response.code` with an integer (`response.code >= 400`), equality of a request attribute with a
string (`request.method == 'POST'`, `xds.cluster_name != 'BlackHoleCluster'`), `.startsWith('...')`
on those strings, joined with `&&`, `||`, `!` and parentheses. Anything else is refused with the
position and what was expected, never guessed at.

Attributes read from the request context (duck-typed: this module imports nothing of the data path):
  response.code     int   the status sent downstream (0 when none went out)
  request.method    str
  request.host      str   the :authority / Host
  request.path      str   path and query, as received
  request.url_path  str   path without the query
  xds.cluster_name  str   the upstream cluster ("" when none)
"""

from __future__ import annotations

import re
from typing import Any, Callable

Predicate = Callable[[Any], bool]


class FilterError(ValueError):
    """An expression outside the supported forms; the message says where and what was expected."""


def _request_text(ctx: Any, field: str) -> str:
    return getattr(ctx.request, field).decode("latin-1")


_INT_ATTRIBUTES: dict[str, Callable[[Any], int]] = {"response.code": lambda ctx: ctx.status}
_STRING_ATTRIBUTES: dict[str, Callable[[Any], str]] = {
    "request.method": lambda ctx: _request_text(ctx, "method"),
    "request.host": lambda ctx: _request_text(ctx, "authority"),
    "request.path": lambda ctx: _request_text(ctx, "target"),
    "request.url_path": lambda ctx: _request_text(ctx, "target").partition("?")[0],
    "xds.cluster_name": lambda ctx: ctx.cluster.name if ctx.cluster is not None else "",
}
ATTRIBUTES = (*_INT_ATTRIBUTES, *_STRING_ATTRIBUTES)

_TOKEN = re.compile(r"""\s*(?:(?P<number>\d+)|(?P<string>'[^'\\]*'|"[^"\\]*")|(?P<op>&&|\|\||==|!=|<=|>=|<|>|!|\(|\))
                     |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*))""", re.VERBOSE)
_COMPARE = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _tokens(expression: str) -> list[tuple[str, str, int]]:
    out, position = [], 0
    text = expression.rstrip()
    while position < len(text):
        m = _TOKEN.match(text, position)
        if m is None or m.end() == position:
            raise FilterError(f"unexpected {text[position:].lstrip()[:20]!r} at offset {position}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        position = m.end()
    return out


class _Parser:
    def __init__(self, expression: str) -> None:
        self.tokens = _tokens(expression)
        self.index = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise FilterError("the expression ends too early")
        self.index += 1
        return token

    def expect(self, value: str) -> None:
        kind, text, at = self.take()
        if text != value:
            raise FilterError(f"expected {value!r} at offset {at}, found {text!r}")

    def parse(self) -> Predicate:
        predicate = self.disjunction()
        token = self.peek()
        if token is not None:
            raise FilterError(f"unexpected {token[1]!r} at offset {token[2]}")
        return predicate

    def disjunction(self) -> Predicate:
        terms = [self.conjunction()]
        while (token := self.peek()) is not None and token[1] == "||":
            self.take()
            terms.append(self.conjunction())
        return terms[0] if len(terms) == 1 else (lambda ctx: any(t(ctx) for t in terms))

    def conjunction(self) -> Predicate:
        terms = [self.unary()]
        while (token := self.peek()) is not None and token[1] == "&&":
            self.take()
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else (lambda ctx: all(t(ctx) for t in terms))

    def unary(self) -> Predicate:
        token = self.peek()
        if token is not None and token[1] == "!":
            self.take()
            inner = self.unary()
            return lambda ctx: not inner(ctx)
        if token is not None and token[1] == "(":
            self.take()
            inner = self.disjunction()
            self.expect(")")
            return inner
        return self.comparison()

    def comparison(self) -> Predicate:
        kind, name, at = self.take()
        if kind != "name":
            raise FilterError(f"expected an attribute at offset {at}, found {name!r}")
        if name.endswith(".startsWith") and name[:-len(".startsWith")] in _STRING_ATTRIBUTES:
            read = _STRING_ATTRIBUTES[name[:-len(".startsWith")]]
            self.expect("(")
            prefix = self.string()
            self.expect(")")
            return lambda ctx: read(ctx).startswith(prefix)
        if name in _INT_ATTRIBUTES:
            read_int = _INT_ATTRIBUTES[name]
            op = self.operator(_COMPARE)
            kind, value, at = self.take()
            if kind != "number":
                raise FilterError(f"{name} compares with an integer; found {value!r} at offset {at}")
            compare, number = _COMPARE[op], int(value)
            return lambda ctx: compare(read_int(ctx), number)
        if name in _STRING_ATTRIBUTES:
            read_text = _STRING_ATTRIBUTES[name]
            op = self.operator(("==", "!="))
            compare, text = _COMPARE[op], self.string()
            return lambda ctx: compare(read_text(ctx), text)
        raise FilterError(f"unknown attribute {name!r} at offset {at}; the attributes are: {', '.join(ATTRIBUTES)}")

    def operator(self, allowed) -> str:  # noqa: ANN001 - a collection of operator strings
        kind, op, at = self.take()
        if op not in allowed:
            raise FilterError(f"expected one of {' '.join(allowed)} at offset {at}, found {op!r}")
        return op

    def string(self) -> str:
        kind, value, at = self.take()
        if kind != "string":
            raise FilterError(f"expected a quoted string at offset {at}, found {value!r}")
        return value[1:-1]


def compile_filter(expression: str) -> Predicate:
    """The predicate of `expression`; FilterError when it is not one of the supported forms."""
    if not expression.strip():
        raise FilterError("the expression is empty")
    # a worker loads the snapshot by compiling the expression again; imported here because the
    # snapshot module imports this one's users
    from proxy.config.snapshot_transfer import rebuilt_by

    return rebuilt_by(_Parser(expression).parse(), compile_filter, expression)
