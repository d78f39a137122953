"""Protocol-neutral HTTP events: HTTP/1.1 and HTTP/2 codecs both produce and consume these.

Everything on the data path is bytes: header names are lowercased ASCII bytes, values are bytes with
surrounding whitespace stripped. Stages, route matchers and the upstream client see only these types,
never h11/h2 objects.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]


def split_authority(authority: bytes) -> tuple[bytes, bytes | None]:
    """"host:port" → (host, port); "[v6]:port" → ("[v6]", port); without a port → (authority, None).
    A colon inside IPv6 brackets is not a port separator (RFC 3986 §3.2.2)."""
    colon = authority.rfind(b":")
    if colon != -1 and b"]" not in authority[colon:]:
        return authority[:colon], authority[colon + 1:]
    return authority, None


class RequestHead:
    """A request's head, as received downstream (or as about to be sent upstream).

    `target` is the raw request-target; `path` is its path part and `query` the part after '?'
    (without the '?'; empty when absent). `authority` comes from Host (HTTP/1.1) or :authority (h2).
    """

    # `sensitive`: fields an HTTP/2 client sent never indexed, to be forwarded so (RFC 7541 §7.1.3)
    __slots__ = ("method", "target", "path", "query", "authority", "scheme", "http_version", "headers", "sensitive")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        *,
        scheme: bytes = b"http",
        http_version: bytes = b"1.1",
    ) -> None:
        self.sensitive: frozenset | None = None
        self.method = method
        self.target = target
        path, sep, query = target.partition(b"?")
        self.path = path
        self.query = query
        self.authority = authority
        self.scheme = scheme
        self.http_version = http_version
        self.headers = headers

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """First value of a (lowercase) header name."""
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def set_target(self, target: bytes) -> None:
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = path
        self.query = query

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r} {self.target!r} authority={self.authority!r})"


class ResponseHead:
    __slots__ = ("status", "reason", "http_version", "headers", "sensitive")

    def __init__(self, status: int, headers: Headers, *, reason: bytes = b"", http_version: bytes = b"1.1") -> None:
        self.sensitive: frozenset | None = None  # as RequestHead.sensitive, from an HTTP/2 upstream
        self.status = status
        self.reason = reason
        self.http_version = http_version
        self.headers = headers

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return default

    def __repr__(self) -> str:
        return f"ResponseHead({self.status})"
