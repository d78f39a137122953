"""The setup of `make bench`'s mutual TLS rows works for triomesh (bench/targets.py, bench/mtls.py): the
MUTUAL Gateway config with the bench's ECDSA certificates serves HTTPS to a client presenting its
certificate and refuses one without, and its tcp route carries the bulk client's upload with the
sink's count checked. (Envoy's side is not exercised here: Envoy is installed by `make bench` only.)"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest
import trio

from bench.l4_bench import MiB, start_sink
from bench.mtls import upload_tls, write_certificates
from bench.targets import start_triomesh_mtls
from tests.integration.backend import Backend


async def test_bench_mutual_tls_http_setup(tmp_path):
    certs = write_certificates(tmp_path / "certs")
    async with trio.open_nursery() as nursery:
        backend = await Backend().start(nursery)
        proxy = await trio.to_thread.run_sync(
            lambda: start_triomesh_mtls(tmp_path / "http", backend.port, certs, cpus=None))
        try:
            url = f"https://127.0.0.1:{proxy.port}/small"

            def get(context: ssl.SSLContext) -> int:
                with urllib.request.urlopen(url, timeout=5, context=context) as response:
                    response.read()
                    return response.status

            for _ in range(3):
                assert await trio.to_thread.run_sync(get, certs.client_context()) == 200
            without_certificate = ssl.create_default_context(cafile=certs.ca)
            without_certificate.check_hostname = False
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await trio.to_thread.run_sync(get, without_certificate)
        finally:
            proxy.stop()
        nursery.cancel_scope.cancel()


def test_bench_mutual_tls_tcp_setup(tmp_path):
    certs = write_certificates(tmp_path / "certs")
    sink, sink_port = start_sink(None)
    try:
        proxy = start_triomesh_mtls(tmp_path / "tcp", sink_port, certs, cpus=None, tcp=True)
        try:
            upload_tls(proxy.port, 4 * MiB, certs.client_context())  # raises unless the sink counted it all
        finally:
            proxy.stop()
    finally:
        sink.kill()
        sink.wait()
