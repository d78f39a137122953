"""The path AuthorizationPolicy `paths` are matched against: Istio's default path normalization
(meshConfig pathNormalization BASE, Envoy's normalize_path): RFC 3986 §6.2.2 — the query and
fragment dropped, backslashes read as slashes, percent-encoded unreserved characters decoded (so
`%2e%2e` is a dot segment), then dot segments removed (RFC 3986 §5.2.4). Slashes are not merged
(that is MERGE_SLASHES), and `%2F` stays encoded (that is DECODE_AND_MERGE_SLASHES).
"""

from __future__ import annotations

import re

# RFC 3986 §2.3 unreserved characters, decoded when percent-encoded (§6.2.2.2)
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + match.group(1).upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` removes the one before it."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_path(target: bytes) -> str:
    """The normalized path of a request target (origin form; its query left out)."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    path = path.replace(b"\\", b"/")
    if b"%" in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    text = path.decode("latin-1")
    if not text.startswith("/"):
        return text  # "*" (OPTIONS) or an authority form: nothing to normalize
    if "/." in text:
        text = remove_dot_segments(text)
    return text
