"""Host field values against RFC 3986's uri-host [":" port] (proxy/l7/host_field.py)."""

from __future__ import annotations

import pytest

from proxy.l7 import host_field
from proxy.l7.host_field import is_valid_host


@pytest.mark.parametrize("value", [
    b"", b"a", b"example.com", b"example.com:80", b"example.com:", b"127.0.0.1:65535", b"[::1]", b"[::1]:0",
    b"[2001:db8::8:800:200c:417a]", b"[::ffff:192.0.2.1]:8080", b"[v7.x:y]", b"%41b.example", b"a!$&'()*+,;=",
])
def test_valid(value):
    assert is_valid_host(value)


@pytest.mark.parametrize("value", [
    b" ", b"a b", b"a/b", b"a?b", b"a#b", b"u@h", b"a\\b", b"a:1:2", b"a:x", b"a:65536", b"a:000080000",
    b"[::1", b"::1]", b"[::1]]", b"[g::1]", b"[1:2:3:4:5:6:7:8:9]", b"[]", b"[v.x]", b"%4", b"%g0", b"\xc3\xa9",
    b"a\tb", b"[::1]:x",
])
def test_invalid(value):
    assert not is_valid_host(value)


def test_remembered_values_are_bounded(monkeypatch):
    monkeypatch.setattr(host_field, "known_valid_hosts", set())
    for i in range(host_field._MAX_REMEMBERED + 50):
        assert is_valid_host(b"h%d.example" % i)
    assert len(host_field.known_valid_hosts) == host_field._MAX_REMEMBERED
    assert not is_valid_host(b"h1.example/")
