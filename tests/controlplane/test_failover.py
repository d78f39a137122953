"""The proxy's choice of control-plane replica (pure), and names resolved to endpoints."""

from __future__ import annotations

import random

import pytest
import structlog
import trio

from proxy.xds.client import addresses_of, resolve
from proxy.xds.failover import ControlPlaneAddress, ControlPlaneEndpoint, Rotation, parse_addresses

A, B, C = (ControlPlaneEndpoint("cp", f"10.0.0.{i}", 15010) for i in (1, 2, 3))


def test_parse_addresses_keeps_order_drops_repeats_and_names_a_bad_entry():
    assert parse_addresses("a:1, [::1]:2,a:1") == (ControlPlaneAddress("a", 1), ControlPlaneAddress("::1", 2))
    assert str(ControlPlaneAddress("::1", 2)) == "[::1]:2"
    with pytest.raises(ValueError, match=r"expected HOST:PORT\[,HOST:PORT...\], got 'b' in 'a:1,b'"):
        parse_addresses("a:1,b")
    assert addresses_of(("h", 5)) == (ControlPlaneAddress("h", 5),)


def test_the_first_round_starts_anywhere_then_after_the_replica_used_last():
    starts = {Rotation(random.Random(seed)).order([A, B, C])[0] for seed in range(30)}
    assert starts == {A, B, C}  # proxies spread over the replicas
    rotation = Rotation(random.Random(1))
    rotation.used(B)
    assert rotation.order([A, B, C]) == [C, A, B]  # the replica that went away is tried last
    assert rotation.order([A, C, C]) in ([A, C], [C, A])  # it is gone from DNS: any start
    assert rotation.order([]) == []


def test_a_name_resolves_to_endpoints_that_keep_it_as_the_tls_server_name():
    async def main():
        return await resolve([ControlPlaneAddress("localhost", 15010), ControlPlaneAddress("127.0.0.2", 15011),
                              ControlPlaneAddress("no-such-host.invalid", 1)], structlog.get_logger("test"))

    endpoints = trio.run(main)
    assert ControlPlaneEndpoint("localhost", "127.0.0.1", 15010) in endpoints
    assert endpoints[-1] == ControlPlaneEndpoint("127.0.0.2", "127.0.0.2", 15011)
    assert str(endpoints[-1]) == "127.0.0.2:15011"
    assert all(e.server_name != "no-such-host.invalid" for e in endpoints)
