"""Which control-plane replica a proxy dials next, pure: the configured addresses, what they resolve to,
and the order to try them in.

A proxy is given one or more HOST:PORT (`--controlplane a:15010,b:15010`); a host name may resolve to
several addresses (a headless service's DNS name, one record per replica). Every round of attempts
resolves the names again (replicas come and go) and tries each resolved endpoint once. The first round
starts at a random endpoint, so proxies spread over the replicas; later rounds start after the
endpoint used last, so a replica that went away is tried last. Between rounds the client waits its
jittered back-off; after a healthy stream ends it moves to the next endpoint at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True, slots=True)
class ControlPlaneAddress:
    """One configured HOST:PORT (the host is also the TLS server name)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ControlPlaneEndpoint:
    """One dialable replica: an IP address, and the configured name its certificate must carry."""

    server_name: str
    ip: str
    port: int

    def __str__(self) -> str:
        where = f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
        return where if self.server_name == self.ip else f"{where} ({self.server_name})"


def parse_addresses(text: str) -> tuple[ControlPlaneAddress, ...]:
    """`host:port[,host:port...]` -> addresses. Raises ValueError naming the bad entry."""
    out: list[ControlPlaneAddress] = []
    for entry in text.split(","):
        entry = entry.strip()
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {entry!r} in {text!r}")
        address = ControlPlaneAddress(host, int(port))
        if address not in out:
            out.append(address)
    return tuple(out)


class Rotation:
    """The order of attempts over the resolved endpoints (see the module docstring)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.last: ControlPlaneEndpoint | None = None

    def order(self, endpoints: Sequence[ControlPlaneEndpoint]) -> list[ControlPlaneEndpoint]:
        unique = list(dict.fromkeys(endpoints))
        if not unique:
            return []
        if self.last in unique:
            start = unique.index(self.last) + 1
        else:
            start = self.rng.randrange(len(unique))
        return unique[start:] + unique[:start]

    def used(self, endpoint: ControlPlaneEndpoint) -> None:
        self.last = endpoint


def endpoints_of(address: ControlPlaneAddress, ips: Iterable[str]) -> list[ControlPlaneEndpoint]:
    return [ControlPlaneEndpoint(address.host, ip, address.port) for ip in dict.fromkeys(ips)]
