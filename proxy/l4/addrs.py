"""Socket address newtypes: which end of a connection an (ip, port) belongs to, checked by type.

A bare tuple says nothing about whether it is the client, the address it dialled, or where we
listen; mixing them up is how a transparent proxy loops back into itself. Each kind is its own
frozen class with the same two fields, so a function asking for an `OrigDstAddr` refuses a
`ClientAddr` under a type checker, and `str()` prints the usual `ip:port` / `[ip]:port`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TypeVar

_A = TypeVar("_A", bound="_IpPort")


@dataclass(frozen=True, slots=True)
class _IpPort:
    ip: str
    port: int

    @classmethod
    def from_sockaddr(cls: type[_A], sockaddr: tuple) -> _A:
        """From the tuple socket calls return (IPv4 (ip, port) or IPv6 (ip, port, flow, scope))."""
        return cls(_canonical_ip(sockaddr[0]), int(sockaddr[1]))

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    def sockaddr(self) -> tuple[str, int]:
        """The tuple socket.connect()/bind() take."""
        return (self.ip, self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def _canonical_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d, seen on dual-stack sockets) becomes plain IPv4; IPv6 text is
    normalised (the kernel's is already canonical, so only text from elsewhere pays for parsing)."""
    if ":" not in ip:
        return ip  # IPv4 from the kernel (inet_ntop) is canonical
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    if "%" in ip:  # link-local with a scope id: keep as is
        return ip
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


class ClientAddr(_IpPort):
    """The downstream peer: who connected to us."""

    __slots__ = ()


class OrigDstAddr(_IpPort):
    """Where the downstream meant to go before netfilter redirected it to us (SO_ORIGINAL_DST)."""

    __slots__ = ()


class LocalAddr(_IpPort):
    """Our own end of an accepted connection (the listener address it arrived on)."""

    __slots__ = ()


class UpstreamAddr(_IpPort):
    """An endpoint we dial."""

    __slots__ = ()


def parse_host_port(text: str) -> tuple[str, int]:
    """'1.2.3.4:80' or '[::1]:80' -> (ip, port). For CLI flags; raises ValueError on junk."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
