"""Address newtypes: distinct types, canonical text, parsing of HOST:PORT flags."""

from __future__ import annotations

import socket

import pytest

from proxy.l4.addrs import ClientAddr, OrigDstAddr, UpstreamAddr, parse_host_port


def test_kinds_do_not_compare_equal() -> None:
    assert ClientAddr("10.0.0.1", 80) != OrigDstAddr("10.0.0.1", 80)
    assert OrigDstAddr("10.0.0.1", 80) == OrigDstAddr("10.0.0.1", 80)
    assert len({OrigDstAddr("10.0.0.1", 80), OrigDstAddr("10.0.0.1", 80)}) == 1


def test_from_sockaddr_canonicalises() -> None:
    assert OrigDstAddr.from_sockaddr(("::ffff:10.0.0.1", 80, 0, 0)) == OrigDstAddr("10.0.0.1", 80)
    assert OrigDstAddr.from_sockaddr(("FD00:0:0::1", 80, 0, 0)) == OrigDstAddr("fd00::1", 80)


def test_text_and_family() -> None:
    assert str(UpstreamAddr("10.0.0.1", 8080)) == "10.0.0.1:8080"
    assert str(UpstreamAddr("fd00::1", 443)) == "[fd00::1]:443"
    assert UpstreamAddr("fd00::1", 443).family == socket.AF_INET6
    assert UpstreamAddr("10.0.0.1", 1).sockaddr() == ("10.0.0.1", 1)


@pytest.mark.parametrize(
    "text, expected", [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:15001", ("::1", 15001)), ("svc:80", ("svc", 80))]
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":80", "host:http", "host:70000", "[::1]80"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)
