"""Istio's default path normalization (BASE) before `paths` are matched."""

import pytest

from proxy.authz.paths import normalize_path


@pytest.mark.parametrize(("target", "path"), [
    (b"/a/b?x=1", "/a/b"),
    (b"/a/./b", "/a/b"),
    (b"/a/../b", "/b"),
    (b"/../../b", "/b"),
    (b"/a/b/..", "/a/"),
    (b"/a/b/.", "/a/b/"),
    (b"/a/%2e%2E/b", "/b"),
    (b"/a\\..\\admin", "/admin"),
    (b"/%61dmin", "/admin"),
    (b"/a%2Fb", "/a%2Fb"),  # an encoded slash stays (DECODE_AND_MERGE_SLASHES is not the default)
    (b"/a%2fb", "/a%2Fb"),
    (b"//admin", "//admin"),  # slashes are not merged (MERGE_SLASHES is not the default)
    (b"/a#frag", "/a"),
    (b"*", "*"),
])
def test_normalize(target, path):
    assert normalize_path(target) == path
