"""Whether a Host field value (or an absolute-form authority) is a valid `uri-host [ ":" port ]`.

RFC 9112 §3.2: a server MUST answer 400 to a request whose Host is not a valid field value. The
grammar is RFC 3986 §3.2.2-3.2.3:

    host        = IP-literal / IPv4address / reg-name
    IP-literal  = "[" ( IPv6address / IPvFuture ) "]"
    IPvFuture   = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
    reg-name    = *( unreserved / pct-encoded / sub-delims )    ; IPv4address is a reg-name too
    port        = *DIGIT

So an empty Host is valid (RFC 9110 §7.2 even requires one when the target has no authority), and
userinfo (`user@host`), spaces, `/`, `?`, `#`, `\\` or a second `:` are not. A port must also name a
TCP port (at most 65535): a larger number can only be a mistake or a probe.

Nearly every request carries one of a few Host values, so the valid ones are remembered in
`known_valid_hosts` (a set lookup instead of a regex match per request; the data path looks there
before it calls `is_valid_host`), up to a bound so that a client cannot grow it.
"""

from __future__ import annotations

import ipaddress
import re

_REG_NAME_CHAR = rb"[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2}"
_HOST = re.compile(
    rb"(?:\[(?P<literal>[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[-A-Za-z0-9._~!$&'()*+,;=:]+)\]"
    rb"|(?:" + _REG_NAME_CHAR + rb")*)"
    rb"(?::(?P<port>[0-9]*))?"
)

_MAX_REMEMBERED = 1024
known_valid_hosts: set[bytes] = set()


def is_valid_host(value: bytes) -> bool:
    """Whether `value` is a valid Host field value (see the module docstring)."""
    if value in known_valid_hosts:
        return True
    if not _check(value):
        return False
    if len(known_valid_hosts) < _MAX_REMEMBERED:
        known_valid_hosts.add(value)
    return True


def _check(value: bytes) -> bool:
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    port = match["port"]
    if port and (len(port) > 5 or int(port) > 65535):
        return False
    literal = match["literal"]
    if literal is not None and literal[:1] not in (b"v", b"V"):
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
    return True
