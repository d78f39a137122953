"""gRPC message counts: the length-prefix walk on bodies cut anywhere, and a real grpcio client and
server through the proxy counted in istio_request_messages_total / istio_response_messages_total."""

from __future__ import annotations

import random

import grpc
import pytest
import trio

from proxy.stats import merge
from proxy.telemetry.grpc_messages import GrpcMessageCounter, is_grpc
from tests import grpc_apps
from tests.integration.test_grpc import _call, _proxy


def _framed(payloads) -> bytes:
    return b"".join(b"\x00" + len(p).to_bytes(4, "big") + p for p in payloads)


def test_messages_are_counted_however_the_body_is_cut() -> None:
    body = _framed([b"", b"abc", b"x" * 70000, b"", b"tail"])
    for seed in range(100):
        pick = random.Random(seed)
        counter = GrpcMessageCounter()
        start = 0
        while start < len(body):
            end = min(len(body), start + pick.choice((1, 2, 4, 5, 6, 1000, 70000)))
            counter.feed(memoryview(body)[start:end])
            start = end
        assert counter.messages == 5, seed
    half = GrpcMessageCounter()
    half.feed(body[:3])  # a prefix not yet complete is no message
    assert half.messages == 0


def test_grpc_content_types() -> None:
    assert is_grpc(b"application/grpc") and is_grpc(b"application/grpc+proto")
    assert not is_grpc(b"application/grpc-web") and not is_grpc(b"application/json") and not is_grpc(None)


@pytest.fixture
def grpc_server():
    server = grpc_apps.start_grpc_server(name="grpc-0")[0]
    yield server
    server.close()


async def test_messages_through_the_proxy(nursery, grpc_server) -> None:
    proxy = await _proxy(nursery, [grpc_server])
    target = f"127.0.0.1:{proxy.port}"
    result = await _call(grpc_apps.unary, target, b"ping", timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    result = await _call(grpc_apps.client_stream, target, [b"a" * 100] * 20, timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    result = await _call(grpc_apps.server_stream, target, 7, 10, timeout=10)
    assert result.code == grpc.StatusCode.OK, result
    await trio.sleep(0.05)  # the last request's accounting runs as its stream ends
    merged = merge([proxy.plane.stats.export()])

    def total(name: str) -> int:
        return sum(v for (_, n, labels), v in merged.items() if n == name and dict(labels)["request_protocol"] == "grpc")

    assert total("istio_requests_total") == 3
    assert total("istio_request_messages_total") == 1 + 20 + 1
    assert total("istio_response_messages_total") == 1 + 1 + 7
