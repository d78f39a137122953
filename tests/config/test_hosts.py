"""Istio host-name rules: short names, aliases, wildcards, namespace scoping, exportTo."""

from __future__ import annotations

import pytest

from proxy.config import hosts


def test_fqdn_expands_short_names_only():
    assert hosts.fqdn("reviews", "default") == "reviews.default.svc.cluster.local"
    assert hosts.fqdn("reviews.prod", "default") == "reviews.prod"
    assert hosts.fqdn("*.example.com", "default") == "*.example.com"
    assert hosts.fqdn("*", "default") == "*"


def test_aliases():
    assert hosts.aliases("reviews", "prod", "prod") == [
        "reviews", "reviews.prod.svc.cluster.local", "reviews.prod.svc", "reviews.prod",
    ]
    # from another namespace the bare name would mean a different service
    assert hosts.aliases("reviews.prod.svc.cluster.local", "prod", "default") == [
        "reviews.prod.svc.cluster.local", "reviews.prod.svc", "reviews.prod",
    ]
    assert hosts.aliases("api.example.com", "prod", "prod") == ["api.example.com"]
    assert hosts.aliases("*.example.com", "prod", "prod") == ["*.example.com"]


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("*", "anything.example", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "*.a.example.com", True),
        ("*.a.example.com", "*.example.com", False),
        ("a.example.com", "a.example.com", True),
        ("a.example.com", "b.example.com", False),
    ],
)
def test_matches(pattern, host, expected):
    assert hosts.matches(pattern, host) is expected


def test_intersect_keeps_the_more_specific():
    assert hosts.intersect("*", "shop.example.com") == "shop.example.com"
    assert hosts.intersect("*.example.com", "*") == "*.example.com"
    assert hosts.intersect("*.example.com", "shop.example.com") == "shop.example.com"
    assert hosts.intersect("shop.example.com", "shop.other.org") is None


def test_split_scoped():
    assert hosts.split_scoped("prod/reviews", "gw-ns") == ("prod", "reviews")
    assert hosts.split_scoped("./reviews", "gw-ns") == ("gw-ns", "reviews")
    assert hosts.split_scoped("reviews", "gw-ns") == ("*", "reviews")


def test_exported_to():
    assert hosts.exported_to((), "a", "b")
    assert hosts.exported_to(("*",), "a", "b")
    assert hosts.exported_to((".",), "a", "a")
    assert not hosts.exported_to((".",), "a", "b")
    assert hosts.exported_to(("b", "c"), "a", "b")
    assert not hosts.exported_to(("c",), "a", "b")
