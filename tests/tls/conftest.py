"""Fixtures of the TLS tests: a trustme CA and a server certificate in files."""

from __future__ import annotations

import pytest
import trustme

from tests.tls.certs import CertFiles, write_cert


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_files(ca, tmp_path) -> CertFiles:
    return write_cert(ca, tmp_path, "server", "example.com", "localhost", "127.0.0.1")
