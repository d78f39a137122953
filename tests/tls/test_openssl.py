"""The data path's TLS library: cryptography's bundled OpenSSL, 3.2 or later, with every function the
data path calls; an unusable one is refused with what is wrong, where a context is asked for."""

from __future__ import annotations

import re

import pytest

from proxy.tls import openssl
from proxy.tls.context import TlsSettingsError, base_context


def test_the_library_is_openssl_3_2_or_later_from_cryptography():
    library = openssl.library()
    found = re.match(r"OpenSSL (\d+)\.(\d+)\.\d+", library.version_text)
    assert found and (int(found.group(1)), int(found.group(2))) >= (3, 2)
    assert library.version_number >= openssl.MINIMUM_VERSION_NUMBER
    assert openssl.describe() == {"library": library.version_text,
                                  "binding": f"cryptography {library.cryptography_version} (bundled OpenSSL)"}
    assert all(hasattr(library.lib, name) for name in openssl.REQUIRED_FUNCTIONS)


def test_an_older_library_or_a_missing_function_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(openssl, "MINIMUM_VERSION_NUMBER", 0x7FFFFFFF)
    with pytest.raises(openssl.TlsLibraryError, match=r"needs OpenSSL 3\.2 or later .* links OpenSSL \d"):
        openssl.Library()
    monkeypatch.undo()
    monkeypatch.setattr(openssl, "REQUIRED_FUNCTIONS", openssl.REQUIRED_FUNCTIONS + ("SSL_no_such_function",))
    with pytest.raises(openssl.TlsLibraryError, match="lacks SSL_no_such_function"):
        openssl.Library()


def test_a_context_without_a_usable_library_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(openssl, "_library", None)
    monkeypatch.setattr(openssl, "MINIMUM_VERSION_NUMBER", 0x7FFFFFFF)
    with pytest.raises(TlsSettingsError, match="no usable TLS library") as caught:
        base_context(True, ("h2",))
    assert caught.value.field == "tls"
    assert isinstance(caught.value.__cause__, openssl.TlsLibraryError)
    assert "needs OpenSSL 3.2" in openssl.describe()["error"]
