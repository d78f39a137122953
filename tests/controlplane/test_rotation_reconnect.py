"""Root rotation as seen by a proxy that is away while it happens: the real client and identity
manager against the in-process control plane over TLS on 127.0.0.1, the CA directory changed by the
rotation steps while the control plane runs."""

from __future__ import annotations

import ssl

import pytest
import trio
from cryptography import x509

from controlplane import tls as control_tls
from controlplane.ca_rotation import add_new_root, drop_old_roots, switch_signer
from controlplane.framed import FramedStream
from controlplane.wire import Hello, Welcome
from cp_harness import wait_for
from proxy.identity.csr import new_key_and_request
from proxy.identity.manager import IdentityManager
from proxy.identity.spiffe import SpiffeId
from proxy.identity.workload import WorkloadIdentity
from proxy.xds.client import ClientOptions, Credentials, NodeInfo, run_client
from test_secure_stream import Mesh, first_reply

TD = "cluster.local"
QUICK_RECONNECT = ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.2)
NODE = NodeInfo("reviews-1", namespace="tutorial", service_account="reviews")
REVIEWS = SpiffeId.of(TD, "tutorial", "reviews")


def leaf_issuer(manager: IdentityManager) -> x509.Name:
    return x509.load_pem_x509_certificates(manager.current.certificate_chain_pem)[0].issuer


def bundle_size(manager: IdentityManager) -> int:
    return len(x509.load_pem_x509_certificates(manager.current.trust_bundle_pem))


async def proxy_visit(mesh: Mesh, port: int, manager: IdentityManager, until, what: str, *, roots: bytes | None = None):
    """Run the proxy (its configured root file: `roots`, else the one from before the rotation) until
    `until()` holds, then take it away."""
    async with trio.open_nursery() as nursery:
        state = await nursery.start(lambda task_status: run_client(
            ("127.0.0.1", port), NODE, lambda resources, version: None, options=QUICK_RECONNECT,
            credentials=Credentials(roots or mesh.roots, mesh.tutorial_token), identity=manager,
            task_status=task_status))
        await wait_for(lambda: state.connected and until(), timeout_s=8.0, what=what)
        nursery.cancel_scope.cancel()
    return state


async def test_a_proxy_away_during_each_rotation_step_comes_back_and_renews(tmp_path):
    mesh = Mesh(tmp_path, ttl_s=3.0)  # renewal at about half: 1.5 s
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager()
        await proxy_visit(mesh, port, manager, lambda: manager.current, "the first certificate")
        old_signer = plane.security.ca.signing_certificate
        issued_before = manager.issued

        # step 1 while the proxy is away: the new root is trusted, the old signer keeps signing,
        # so the proxy, which trusts only the old root, gets back in and renews (and gets both roots)
        new_root = add_new_root(mesh.ca_dir, TD)
        await wait_for(lambda: len(plane.security.ca.roots) == 2, what="the control plane loading step 1")
        assert plane.security.ca.signing_certificate == old_signer
        await proxy_visit(mesh, port, manager, lambda: manager.issued > issued_before and bundle_size(manager) == 2,
                          "a renewal after step 1")
        assert leaf_issuer(manager) == old_signer.subject

        # step 2 while it is away: the control plane's own certificate now comes from the new root,
        # which the proxy has from its renewal; its certificate (old root) is still accepted
        switch_signer(mesh.ca_dir, TD)
        await wait_for(lambda: plane.security.ca.signing_certificate == new_root, what="the control plane switching")
        issued_before = manager.issued
        await proxy_visit(mesh, port, manager, lambda: manager.issued > issued_before, "a renewal after step 2")
        assert leaf_issuer(manager) == new_root.subject and manager.failures == 0

        # step 3: only the new root; the proxy, now with a new-root certificate, comes back once more
        drop_old_roots(mesh.ca_dir, TD)
        await wait_for(lambda: len(plane.security.ca.roots) == 1, what="the control plane dropping the old root")
        await proxy_visit(mesh, port, manager, lambda: True, "a connection after step 3")
        nursery.cancel_scope.cancel()


async def test_a_proxy_whose_root_was_dropped_while_away_gets_back_in_with_its_token(tmp_path):
    """Its certificate (old root, valid for long still) is refused in the TLS handshake now; it
    connects again without one and its bootstrap token admits it."""
    mesh = Mesh(tmp_path, ttl_s=600.0)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager()
        await proxy_visit(mesh, port, manager, lambda: manager.current, "the first certificate")
        new_root = add_new_root(mesh.ca_dir, TD)
        switch_signer(mesh.ca_dir, TD)
        drop_old_roots(mesh.ca_dir, TD)
        await wait_for(lambda: plane.security.ca.roots == (new_root,), what="the control plane trusting the new root only")
        assert manager.usable_now() is not None  # what it shows in the handshake: valid, but no longer trusted
        new_root_file = (mesh.ca_dir / "root-cert.pem").read_bytes()  # the operator handed it the new root file
        state = await proxy_visit(mesh, port, manager, lambda: True, "the proxy admitted again", roots=new_root_file)
        assert state.identity == REVIEWS.uri
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_a_refused_client_certificate_is_dropped_for_the_token(tmp_path, version):
    """The server's refusal comes in the handshake (TLS 1.2) or as its first record (TLS 1.3)."""
    mesh = Mesh(tmp_path)
    stranger = Mesh(tmp_path / "other")  # another CA: its certificates are not trusted here
    keys = new_key_and_request(REVIEWS)
    issued = stranger.security.ca.issue(keys.csr_pem, REVIEWS, 3600)
    foreign = WorkloadIdentity.from_pem(issued.chain_pem, keys.private_key_pem, stranger.roots)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        context = control_tls.client_context(mesh.roots, foreign)
        for each in (context, context.without_certificate):
            each.maximum_version = version
        framed = FramedStream(await control_tls.connect("127.0.0.1", port, context))
        assert framed.sock.version() == version.name.replace("_", ".")
        assert framed.sock.context is context.without_certificate
        welcome = await first_reply(framed, Hello(node_id="reviews-1", namespace="tutorial", service_account="reviews",
                                                  token=mesh.tutorial_token))
        assert isinstance(welcome, Welcome) and welcome.identity == REVIEWS.uri
        await framed.aclose()
        # a certificate the server accepts is kept (no second handshake): it alone proves the identity
        keys = new_key_and_request(REVIEWS)
        own = WorkloadIdentity.from_pem(mesh.security.ca.issue(keys.csr_pem, REVIEWS, 3600).chain_pem,
                                        keys.private_key_pem, mesh.roots)
        context = control_tls.client_context(mesh.roots, own)
        context.maximum_version = version
        framed = FramedStream(await control_tls.connect("127.0.0.1", port, context))
        assert framed.sock.context is context
        welcome = await first_reply(framed, Hello(node_id="reviews-1", namespace="tutorial", service_account="reviews"))
        assert isinstance(welcome, Welcome) and welcome.identity == REVIEWS.uri
        await framed.aclose()
        nursery.cancel_scope.cancel()
