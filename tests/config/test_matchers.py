"""HTTPMatchRequest semantics: uri exact/prefix/regex, headers, method, authority, query, OR/AND."""

from __future__ import annotations

import msgspec
import pytest

from proxy.config.istio import HTTPMatchRequest, dec_hook
from proxy.config.matchers import MatchContext, compile_matches, parse_query
from tests.config.helpers import head

MESH = MatchContext("mesh", None, None)


def matcher(*blocks: dict, ctx: MatchContext = MESH):
    typed = [msgspec.convert(b, HTTPMatchRequest, dec_hook=dec_hook) for b in blocks]
    return compile_matches(typed, ctx, lambda g: g if "/" in g or g == "mesh" else f"default/{g}")


def test_no_match_blocks_match_everything():
    m = matcher()
    assert m(head(b"/anything?x=1", method=b"DELETE"))


def test_uri_exact_ignores_the_query():
    m = matcher({"uri": {"exact": "/ratings"}})
    assert m(head(b"/ratings"))
    assert m(head(b"/ratings?user=jason"))
    assert not m(head(b"/ratings/"))
    assert not m(head(b"/Ratings"))


def test_uri_prefix():
    m = matcher({"uri": {"prefix": "/ratings/v2/"}})
    assert m(head(b"/ratings/v2/"))
    assert m(head(b"/ratings/v2/x?y"))
    assert not m(head(b"/ratings/v2"))
    assert not m(head(b"/x/ratings/v2/"))


def test_uri_regex_is_a_full_match():
    m = matcher({"uri": {"regex": "/api/v[0-9]+/.*"}})
    assert m(head(b"/api/v12/users"))
    assert not m(head(b"/prefix/api/v1/x"))  # full match: no search
    assert not m(head(b"/api/vX/users"))
    anchored = matcher({"uri": {"regex": "/x"}})
    assert not anchored(head(b"/xy"))
    assert anchored(head(b"/x?q=1"))


def test_ignore_uri_case_for_exact_and_prefix():
    m = matcher({"uri": {"prefix": "/Ratings"}, "ignoreUriCase": True})
    assert m(head(b"/RATINGS/1"))
    assert m(head(b"/ratings"))
    e = matcher({"uri": {"exact": "/a/B"}, "ignoreUriCase": True})
    assert e(head(b"/A/b")) and not e(head(b"/a/bc"))


def test_headers_exact_prefix_regex_and_presence():
    m = matcher({"headers": {"end-user": {"exact": "jason"}}})
    assert m(head(headers=[(b"end-user", b"jason")]))
    assert not m(head(headers=[(b"end-user", b"jason2")]))
    assert not m(head())
    safari = matcher({"headers": {"user-agent": {"regex": ".*Safari.*"}}})
    assert safari(head(headers=[(b"user-agent", b"Mozilla/5.0 (Macintosh) AppleWebKit Safari/605")]))
    assert not safari(head(headers=[(b"user-agent", b"curl/8.0")]))
    prefix = matcher({"headers": {"x-canary": {"prefix": "yes"}}})
    assert prefix(head(headers=[(b"x-canary", b"yes-please")]))
    present = matcher({"headers": {"x-debug": {}}})
    assert present(head(headers=[(b"x-debug", b"")]))
    assert not present(head())


def test_header_names_in_config_are_case_insensitive_and_values_case_sensitive():
    m = matcher({"headers": {"End-User": {"exact": "jason"}}})
    assert m(head(headers=[(b"end-user", b"jason")]))
    assert not m(head(headers=[(b"end-user", b"Jason")]))


def test_repeated_headers_are_joined_with_commas():
    m = matcher({"headers": {"x-tag": {"exact": "a,b"}}})
    assert m(head(headers=[(b"x-tag", b"a"), (b"x-tag", b"b")]))
    assert not m(head(headers=[(b"x-tag", b"a")]))


def test_without_headers():
    m = matcher({"withoutHeaders": {"x-internal": {"exact": "true"}}})
    assert m(head())
    assert m(head(headers=[(b"x-internal", b"false")]))
    assert not m(head(headers=[(b"x-internal", b"true")]))
    absent = matcher({"withoutHeaders": {"x-debug": {}}})
    assert absent(head()) and not absent(head(headers=[(b"x-debug", b"1")]))


def test_method_authority_scheme():
    m = matcher({"method": {"exact": "POST"}})
    assert m(head(method=b"POST")) and not m(head(method=b"GET")) and not m(head(method=b"post"))
    a = matcher({"authority": {"prefix": "api."}})
    assert a(head(authority=b"api.example.com:8080")) and not a(head(authority=b"www.example.com"))
    s = matcher({"scheme": {"exact": "https"}})
    assert s(head(scheme=b"https")) and not s(head())


def test_query_params():
    m = matcher({"queryParams": {"user": {"exact": "jason"}, "debug": {"exact": ""}}})
    assert m(head(b"/?user=jason&debug"))
    assert m(head(b"/?debug=&user=jason"))
    assert not m(head(b"/?user=jason"))
    assert not m(head(b"/?user=jasonx&debug"))
    assert not m(head(b"/"))
    digits = matcher({"queryParams": {"id": {"regex": r"\d+"}}})
    assert digits(head(b"/?id=123")) and not digits(head(b"/?id=a123")) and not digits(head(b"/?id=123a"))
    assert parse_query(b"a=1&a=2&b") == {b"a": b"1", b"b": b""}


def test_fields_in_one_block_and_blocks_or():
    m = matcher(
        {"uri": {"prefix": "/reviews"}, "headers": {"end-user": {"exact": "jason"}}},
        {"method": {"exact": "DELETE"}},
    )
    assert m(head(b"/reviews/1", headers=[(b"end-user", b"jason")]))
    assert not m(head(b"/reviews/1"))  # AND inside the first block fails
    assert not m(head(b"/other", headers=[(b"end-user", b"jason")]))
    assert m(head(b"/other", method=b"DELETE"))  # second block


def test_port_on_a_gateway_listener_is_decided_at_compile_time():
    on_80 = MatchContext("default/gw", 80, None)
    assert matcher({"port": 80}, ctx=on_80)(head())
    assert matcher({"port": 8080}, ctx=on_80) is None  # never matches here: the route is dropped
    assert matcher({"port": 8080}, {"uri": {"prefix": "/"}}, ctx=on_80)(head(b"/x"))


def test_port_on_a_mesh_listener_comes_from_the_authority():
    m = matcher({"port": 9080})
    assert m(head(authority=b"reviews:9080"))
    assert not m(head(authority=b"reviews"))
    assert matcher({"port": 80})(head(authority=b"reviews"))
    assert matcher({"port": 443})(head(authority=b"reviews", scheme=b"https"))


def test_match_gateways_and_source_labels():
    gw = MatchContext("default/gw", 80, {"app": "edge"})
    assert matcher({"gateways": ["gw"]}, ctx=gw)(head())
    assert matcher({"gateways": ["mesh"]}, ctx=gw) is None
    assert matcher({"sourceLabels": {"app": "edge"}}, ctx=gw)(head())
    assert matcher({"sourceLabels": {"app": "other"}}, ctx=gw) is None


@pytest.mark.parametrize("key", ["uri", "method", "authority", "scheme"])
def test_reserved_header_keys_are_ignored_as_istio_documents(key):
    assert matcher({"headers": {key: {"exact": "nothing-matches-this"}}})(head())


def test_host_and_pseudo_header_keys_address_the_head():
    m = matcher({"headers": {":authority": {"exact": "a.example"}}})
    assert m(head(authority=b"a.example")) and not m(head(authority=b"b.example"))
    assert matcher({"headers": {"host": {"prefix": "a."}}})(head(authority=b"a.example"))
