"""The renewal schedule and SPIFFE IDs (pure), and the IdentityManager's retry on a refused or
malformed reply, driven without a network (replies handed in as the stream's receive loop does)."""

from __future__ import annotations

import random

import pytest
import trio

from controlplane.ca import CertificateAuthority
from controlplane.wire import CertificateReply
from proxy.identity.manager import IdentityManager
from proxy.identity.renewal import MIN_RENEWAL_INTERVAL_S, renew_at, retry_delay
from proxy.identity.spiffe import InvalidSpiffeId, SpiffeId


def test_renewal_at_half_the_lifetime_with_jitter_counted_from_arrival():
    rng = random.Random(7)
    times = [renew_at(1000.0, 1000.0 + 86400, rng) for _ in range(500)]
    assert all(1000 + 0.45 * 86400 <= t <= 1000 + 0.55 * 86400 for t in times)
    assert len(set(times)) > 400  # spread, so proxies started together do not renew together
    # a certificate backdated by the CA: its not-before plays no part
    assert 1000 + 1.35 <= renew_at(1000.0, 1003.0, rng) <= 1000 + 1.65
    assert renew_at(1000.0, 1000.1, rng) == 1000 + MIN_RENEWAL_INTERVAL_S  # never spins


def test_retry_backs_off_but_fits_several_attempts_before_expiry():
    rng = random.Random(1)
    delays = [max(retry_delay(attempt, not_after=None, now=0.0, rng=rng) for _ in range(200)) for attempt in range(8)]
    assert delays[0] <= 0.5 and delays[4] > 2.0 and max(delays) <= 30.0
    assert all(retry_delay(9, not_after=100.0, now=90.0, rng=rng) <= 1.0 for _ in range(100))


@pytest.mark.parametrize("uri, error", [
    ("spiffe://cluster.local/ns/tutorial/sa/reviews", None),
    ("https://cluster.local/ns/tutorial/sa/reviews", "not a spiffe:// URI"),
    ("spiffe://cluster.local/ns/tutorial/sa/reviews/extra", "not of the form"),
    ("spiffe://cluster.local/ns/Tutorial/sa/reviews", "namespace 'Tutorial' is not a valid name"),
    ("spiffe://cluster.local/ns/tutorial/sa/", "service account '' is not a valid name"),
])
def test_spiffe_ids(uri, error):
    if error is None:
        assert SpiffeId.parse(uri).uri == uri
    else:
        with pytest.raises(InvalidSpiffeId, match=error):
            SpiffeId.parse(uri)


async def test_a_refused_or_malformed_reply_is_retried_and_the_old_certificate_kept(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    reviews = SpiffeId.of("cluster.local", "tutorial", "reviews")
    manager = IdentityManager(rng=random.Random(3))
    replies = iter(["refuse", "garbage", "sign"])
    sent = []

    async def send_request(request_id: int, csr_pem: bytes) -> None:
        sent.append(request_id)
        kind = next(replies)
        if kind == "refuse":
            reply = CertificateReply(request_id=request_id, error_code="PERMISSION_DENIED", error="not today")
        elif kind == "garbage":
            reply = CertificateReply(request_id=request_id, certificate_chain=b"not pem", trust_bundle=b"")
        else:
            issued = ca.issue(csr_pem, reviews, 3600)
            reply = CertificateReply(request_id=request_id, certificate_chain=issued.chain_pem,
                                     trust_bundle=ca.trust_bundle_pem)
        manager.deliver(request_id, reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run_on_stream, reviews.uri, send_request)
        with trio.fail_after(10):
            while manager.current is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sent == [1, 2, 3] and manager.failures == 2 and manager.issued == 1
    assert manager.current.spiffe_id == reviews.uri and manager.last_error == ""


async def test_a_trust_bundle_that_would_not_trust_the_certificate_is_refused(tmp_path):
    from controlplane.ca_rotation import add_new_root
    from proxy.identity.csr import new_key_and_request
    from proxy.identity.workload import IdentityError, WorkloadIdentity

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    reviews = SpiffeId.of("cluster.local", "tutorial", "reviews")
    keys = new_key_and_request(reviews)
    issued = ca.issue(keys.csr_pem, reviews, 3600)
    identity = WorkloadIdentity.from_pem(issued.chain_pem, keys.private_key_pem, ca.trust_bundle_pem)
    stranger = CertificateAuthority.load_or_create(tmp_path / "other", "cluster.local")
    with pytest.raises(IdentityError, match="does not verify against the trust bundle"):
        WorkloadIdentity.from_pem(issued.chain_pem, keys.private_key_pem, stranger.trust_bundle_pem)
    manager = IdentityManager()
    manager.current = identity
    for bad in (b"garbage", stranger.trust_bundle_pem):
        await manager.update_trust_bundle(bad)
        assert manager.current is identity and "trust bundle from the control plane refused" in manager.last_error
    add_new_root(tmp_path / "ca", "cluster.local")
    both = CertificateAuthority.load(tmp_path / "ca", "cluster.local").trust_bundle_pem
    await manager.update_trust_bundle(both)
    assert manager.current.trust_bundle_pem == both and manager.current.serial == identity.serial
