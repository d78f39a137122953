"""The data path's TLS library: our BoringSSL build when it is built (native/build_boringssl.py), else
cryptography's bundled OpenSSL, 3.2 or later, with every function the data path calls; an unusable
one is refused with what is wrong, where a context is asked for."""

from __future__ import annotations

import re

import pytest

from proxy.tls import openssl
from proxy.tls.context import TlsSettingsError, base_context


def test_the_default_library_is_our_boringssl_build():
    """make install builds it; a checkout without it falls back to cryptography's OpenSSL, which
    /server_info would name instead."""
    library = openssl.library()
    assert library.boringssl, "BoringSSL is not built: python native/build_boringssl.py"
    assert library.version_text == "BoringSSL"
    assert openssl.describe() == {"library": "BoringSSL", "binding": "triomesh's own (native/build_boringssl.py)"}
    assert all(hasattr(library.lib, name) for name in openssl.REQUIRED_FUNCTIONS)


def test_cryptographys_openssl_is_3_2_or_later_with_every_function():
    library = openssl.Library("openssl")
    found = re.match(r"OpenSSL (\d+)\.(\d+)\.\d+", library.version_text)
    assert found and (int(found.group(1)), int(found.group(2))) >= (3, 2)
    assert library.version_number >= openssl.MINIMUM_VERSION_NUMBER
    assert re.fullmatch(r"cryptography [\d.]+ \(bundled OpenSSL\)", library.binding)
    assert all(hasattr(library.lib, name) for name in openssl.REQUIRED_FUNCTIONS)


def test_an_older_openssl_or_a_missing_function_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(openssl, "MINIMUM_VERSION_NUMBER", 0x7FFFFFFF)
    with pytest.raises(openssl.TlsLibraryError, match=r"needs OpenSSL 3\.2 or later .* links OpenSSL \d"):
        openssl.Library("openssl")
    monkeypatch.undo()
    monkeypatch.setattr(openssl, "REQUIRED_FUNCTIONS", openssl.REQUIRED_FUNCTIONS + ("SSL_no_such_function",))
    with pytest.raises(openssl.TlsLibraryError, match="lacks SSL_no_such_function"):
        openssl.Library("openssl")


def test_a_context_without_a_usable_library_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(openssl, "_library", None)
    monkeypatch.setenv("TRIOMESH_TLS_LIBRARY", "openssl")
    monkeypatch.setattr(openssl, "MINIMUM_VERSION_NUMBER", 0x7FFFFFFF)
    with pytest.raises(TlsSettingsError, match="no usable TLS library") as caught:
        base_context(True, ("h2",))
    assert caught.value.field == "tls"
    assert isinstance(caught.value.__cause__, openssl.TlsLibraryError)
    assert "needs OpenSSL 3.2" in openssl.describe()["error"]
    monkeypatch.setenv("TRIOMESH_TLS_LIBRARY", "gnutls")
    with pytest.raises(TlsSettingsError, match="boringssl or openssl"):
        base_context(True, ("h2",))
