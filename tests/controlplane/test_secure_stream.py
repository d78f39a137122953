"""The control-plane protocol over TLS with a CA, in process on 127.0.0.1: who is admitted (token,
client certificate), what is refused and how precisely, certificate requests and renewal over the
stream with the real client, and root rotation reaching a connected proxy."""

from __future__ import annotations

import ssl
import time

import pytest
import structlog
import trio
from cryptography import x509

from controlplane import tls as control_tls
from controlplane.ca_rotation import add_new_root, switch_signer
from controlplane.framed import FramedStream, StreamClosed, connect
from controlplane.security import Security, SecurityOptions
from controlplane.server import ControlPlane, ServerOptions
from controlplane.store import ConfigStore
from controlplane.tokens import create_token
from controlplane.wire import (
    ApplyRequest,
    ApplyResult,
    CertificateReply,
    CertificateRequest,
    Error,
    Hello,
    Source,
    StatusReply,
    StatusRequest,
    Welcome,
    encode_frame,
)
from cp_harness import FAST, next_snapshot, wait_for
from proxy.identity.csr import new_key_and_request
from proxy.identity.manager import IdentityManager
from proxy.identity.spiffe import SpiffeId
from proxy.xds.client import ClientOptions, Credentials, NodeInfo, run_client


class Spying(ControlPlane):
    """The real control plane, keeping every certificate request it received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[CertificateRequest] = []

    async def _sign(self, proxy, framed, request):
        self.requests.append(request)
        await super()._sign(proxy, framed, request)


class Mesh:
    def __init__(self, tmp_path, ttl_s: float = 3600.0) -> None:
        self.ca_dir = tmp_path / "ca"
        self.security = Security.open(SecurityOptions(self.ca_dir, server_hosts=("127.0.0.1", "localhost"),
                                                      workload_cert_ttl_s=ttl_s))
        tokens = self.ca_dir / "tokens.json"
        self.tutorial_token = create_token(tokens, namespace="tutorial")
        self.admin_token = create_token(tokens, admin=True)
        self.roots = self.security.ca.trust_bundle_pem

    async def start(self, nursery: trio.Nursery, plane_class: type[Spying] = Spying) -> tuple[Spying, int]:
        store = ConfigStore(None)
        store.load_directory()
        plane = plane_class(store, ServerOptions(**FAST), structlog.get_logger("test.controlplane"), self.security)
        port = await nursery.start(plane.serve, "127.0.0.1", 0)
        return plane, port

    def context(self, identity=None) -> ssl.SSLContext:
        return control_tls.client_context(self.roots, identity)


async def first_reply(framed: FramedStream, message):
    await framed.send(message)
    with trio.fail_after(5):
        return await framed.receive()


async def test_a_plaintext_client_is_refused_with_a_precise_error(tmp_path):
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        framed = await connect("127.0.0.1", port)
        reply = await first_reply(framed, Hello(node_id="plain", namespace="tutorial", token=mesh.tutorial_token))
        assert isinstance(reply, Error) and reply.code == "TLS_REQUIRED"
        with pytest.raises(StreamClosed):
            with trio.fail_after(5):
                await framed.receive()
        await framed.aclose()
        assert "plain" not in plane.proxies
        nursery.cancel_scope.cancel()


async def test_the_control_plane_certificate_is_verified_by_the_root(tmp_path):
    mesh = Mesh(tmp_path)
    stranger = control_tls.client_context(Mesh(tmp_path / "other").roots)  # another CA's root
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        with pytest.raises(control_tls.TlsFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await control_tls.connect("127.0.0.1", port, stranger)
        sock = await control_tls.connect("localhost", port, mesh.context())  # a DNS SAN too
        certificate = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "spiffe://cluster.local/ns/istio-system/sa/istiod" in names.get_values_for_type(x509.UniformResourceIdentifier)
        sock.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("token, namespace, code, text", [
    ("", "tutorial", "UNAUTHENTICATED", "no bootstrap token and no client certificate"),
    ("not-a-token", "tutorial", "UNAUTHENTICATED", "the bootstrap token is not known"),
    ("TUTORIAL", "finance", "PERMISSION_DENIED", "grants namespace 'tutorial', not 'finance'"),
    ("TUTORIAL", "Bad/Name", "BAD_HELLO", "not a valid name"),
])
async def test_proxies_without_a_proof_of_identity_are_refused(tmp_path, token, namespace, code, text):
    mesh = Mesh(tmp_path)
    token = mesh.tutorial_token if token == "TUTORIAL" else token
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        framed = await connect("127.0.0.1", port, tls=mesh.context())
        reply = await first_reply(framed, Hello(node_id="p", namespace=namespace, token=token))
        assert isinstance(reply, Error) and reply.code == code and text in reply.message, reply
        await framed.aclose()
        assert "p" not in plane.proxies  # it got nothing: no Welcome, no config
        nursery.cancel_scope.cancel()


async def test_cli_requests_need_an_admin_token(tmp_path):
    mesh = Mesh(tmp_path)
    yaml = b"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a, namespace: tutorial}\n" \
           b"spec: {hosts: [a], resolution: STATIC, ports: [{number: 80, name: http, protocol: HTTP}]}\n"
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        for message, code in ((StatusRequest(), "UNAUTHENTICATED"),
                              (StatusRequest(token=mesh.tutorial_token), "PERMISSION_DENIED"),
                              (ApplyRequest(sources=[Source("a.yaml", yaml)]), "UNAUTHENTICATED")):
            framed = await connect("127.0.0.1", port, tls=mesh.context())
            reply = await first_reply(framed, message)
            await framed.aclose()
            assert isinstance(reply, Error) and reply.code == code, reply
        assert len(plane.store.state) == 0
        framed = await connect("127.0.0.1", port, tls=mesh.context())
        reply = await first_reply(framed, ApplyRequest(sources=[Source("a.yaml", yaml)], token=mesh.admin_token))
        await framed.aclose()
        assert isinstance(reply, ApplyResult) and reply.ok and reply.created == ["ServiceEntry tutorial/a"]
        framed = await connect("127.0.0.1", port, tls=mesh.context())
        assert isinstance(await first_reply(framed, StatusRequest(token=mesh.admin_token)), StatusReply)
        await framed.aclose()
        nursery.cancel_scope.cancel()


async def test_a_token_for_one_namespace_cannot_get_a_certificate_in_another(tmp_path):
    """Admitted for tutorial, the proxy cannot have a CSR for finance signed on its stream."""
    mesh = Mesh(tmp_path)
    finance = new_key_and_request(SpiffeId.of("cluster.local", "finance", "default"))
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        framed = await connect("127.0.0.1", port, tls=mesh.context())
        welcome = await first_reply(framed, Hello(node_id="p", namespace="tutorial", token=mesh.tutorial_token))
        assert isinstance(welcome, Welcome) and welcome.issues_certificates
        assert welcome.identity == "spiffe://cluster.local/ns/tutorial/sa/default"
        await next_snapshot(framed)
        await framed.send(CertificateRequest(request_id=7, csr=finance.csr_pem))
        with trio.fail_after(5):
            while not isinstance(reply := await framed.receive(), CertificateReply):
                pass
        assert reply.request_id == 7 and not reply.certificate_chain
        assert reply.error_code == "PERMISSION_DENIED" and "ns/finance" in reply.error
        await framed.aclose()
        nursery.cancel_scope.cancel()


async def test_certificates_over_the_stream_carry_no_private_key_and_renew_before_expiry(tmp_path):
    """The real client against a CA issuing 3-second certificates: from the first issue on, the
    proxy always holds a valid certificate, renewals keep coming, and what travelled is CSRs only."""
    mesh = Mesh(tmp_path, ttl_s=3.0)
    changes = []
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager(changes.append)
        node = NodeInfo("reviews-1", namespace="tutorial", service_account="reviews")
        options = ClientOptions(backoff_initial_s=0.05, backoff_max_s=0.2)
        await nursery.start(lambda task_status: run_client(
            ("127.0.0.1", port), node, lambda resources, version: None, options=options,
            credentials=Credentials(mesh.roots, mesh.tutorial_token), identity=manager, task_status=task_status))
        await wait_for(lambda: manager.current, what="the first certificate")
        samples = 0
        deadline = trio.current_time() + 7.0
        while trio.current_time() < deadline:
            identity = manager.current
            assert identity.valid_at(time.time()), f"certificate {identity.serial} expired at {identity.not_after}"
            samples += 1
            await trio.sleep(0.05)
        assert samples > 100
        assert manager.issued >= 4 and manager.failures == 0  # 3 s lifetime, renewed at about half
        assert len({c.serial for c in changes}) == len(changes) == manager.issued
        assert {c.spiffe_id for c in changes} == {"spiffe://cluster.local/ns/tutorial/sa/reviews"}
        assert len({c.private_key_pem for c in changes}) == len(changes)  # a new key each time
        # what the control plane received: CSRs, never a key
        assert len(plane.requests) == manager.issued
        for request in plane.requests:
            frame = encode_frame(request)
            assert b"PRIVATE KEY" not in frame
            assert all(c.private_key_pem not in frame for c in changes)
            x509.load_pem_x509_csr(request.csr)
        assert plane.proxies["reviews-1"].certificate_serial == manager.current.serial
        nursery.cancel_scope.cancel()


async def test_a_renewal_may_prove_the_identity_with_the_certificate_alone(tmp_path):
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager()
        node = NodeInfo("reviews-1", namespace="tutorial", service_account="reviews")
        async with trio.open_nursery() as client:
            await client.start(lambda task_status: run_client(
                ("127.0.0.1", port), node, lambda resources, version: None,
                credentials=Credentials(mesh.roots, mesh.tutorial_token), identity=manager, task_status=task_status))
            await wait_for(lambda: manager.current, what="the first certificate")
            client.cancel_scope.cancel()
        # no token now: the TLS client certificate proves who it is
        framed = await connect("127.0.0.1", port, tls=mesh.context(manager.current))
        welcome = await first_reply(framed, Hello(node_id="reviews-1", namespace="tutorial", service_account="reviews"))
        assert isinstance(welcome, Welcome) and welcome.identity == "spiffe://cluster.local/ns/tutorial/sa/reviews"
        await framed.aclose()
        # and only that one: the same certificate does not open a stream as another service account
        framed = await connect("127.0.0.1", port, tls=mesh.context(manager.current))
        refused = await first_reply(framed, Hello(node_id="ratings-1", namespace="tutorial", service_account="ratings"))
        assert isinstance(refused, Error) and refused.code == "PERMISSION_DENIED"
        assert "sa/reviews, not spiffe://cluster.local/ns/tutorial/sa/ratings" in refused.message
        await framed.aclose()
        nursery.cancel_scope.cancel()


async def test_root_rotation_reaches_a_connected_proxy_with_both_roots(tmp_path):
    mesh = Mesh(tmp_path, ttl_s=4.0)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager()
        node = NodeInfo("reviews-1", namespace="tutorial", service_account="reviews")
        client = await nursery.start(lambda task_status: run_client(
            ("127.0.0.1", port), node, lambda resources, version: None,
            credentials=Credentials(mesh.roots, mesh.tutorial_token), identity=manager, task_status=task_status))
        first = await wait_for(lambda: manager.current, what="the first certificate")
        old_root = x509.load_pem_x509_certificates(first.trust_bundle_pem)
        new_root = add_new_root(mesh.ca_dir, "cluster.local")
        # the new bundle arrives (pushed on the CA change)
        await wait_for(lambda: len(x509.load_pem_x509_certificates(manager.current.trust_bundle_pem)) == 2,
                       what="the bundle with both roots")
        bundle = x509.load_pem_x509_certificates(manager.current.trust_bundle_pem)
        assert bundle == [*old_root, new_root]
        switch_signer(mesh.ca_dir, "cluster.local")  # then, at the next renewal, a certificate from the new root

        def from_new_root():
            leaf = x509.load_pem_x509_certificates(manager.current.certificate_chain_pem)[0]
            return leaf.issuer == new_root.subject

        await wait_for(from_new_root, timeout_s=6.0, what="a certificate signed by the new root")
        assert manager.failures == 0
        # the control plane's own certificate now comes from the new root, which the proxy's configured
        # root file does not hold: it reconnects trusting the bundle it received
        state = plane.proxies["reviews-1"]
        await state.stream.aclose()
        await wait_for(lambda: client.connects >= 2 and client.connected,
                       what="the proxy back on a stream verified by the new root")
        nursery.cancel_scope.cancel()


async def test_another_identity_cannot_take_over_a_node_id(tmp_path):
    """Admitted for tutorial/ratings, a proxy cannot replace the stream (and registration) of the proxy
    that holds node id reviews-1 as tutorial/reviews."""
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        owner = await connect("127.0.0.1", port, tls=mesh.context())
        welcome = await first_reply(owner, Hello(node_id="reviews-1", namespace="tutorial", service_account="reviews",
                                                 token=mesh.tutorial_token))
        assert isinstance(welcome, Welcome)
        intruder = await connect("127.0.0.1", port, tls=mesh.context())
        refused = await first_reply(intruder, Hello(node_id="reviews-1", namespace="tutorial",
                                                    service_account="ratings", token=mesh.tutorial_token))
        assert isinstance(refused, Error) and refused.code == "PERMISSION_DENIED"
        assert "belongs to spiffe://cluster.local/ns/tutorial/sa/reviews" in refused.message
        assert plane.proxies["reviews-1"].stream is not None and plane.proxies["reviews-1"].session == 1
        await intruder.aclose()
        await owner.aclose()
        nursery.cancel_scope.cancel()


async def test_a_plugin_ca_serves_its_intermediate_and_is_verified_by_the_operator_root(tmp_path):
    import trustme

    root = trustme.CA(organization_name="operator root")
    intermediate = root.create_child_ca()
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca-cert.pem").write_bytes(intermediate.cert_pem.bytes())
    (ca_dir / "ca-key.pem").write_bytes(intermediate.private_key_pem.bytes())
    (ca_dir / "ca-key.pem").chmod(0o600)
    (ca_dir / "root-cert.pem").write_bytes(root.cert_pem.bytes())
    (ca_dir / "cert-chain.pem").write_bytes(intermediate.cert_pem.bytes() + root.cert_pem.bytes())
    security = Security.open(SecurityOptions(ca_dir, server_hosts=("127.0.0.1",)))
    assert not security.ca.created
    token = create_token(ca_dir / "tokens.json", namespace="tutorial")
    store = ConfigStore(None)
    store.load_directory()
    async with trio.open_nursery() as nursery:
        plane = ControlPlane(store, ServerOptions(**FAST), structlog.get_logger("test.controlplane"), security)
        port = await nursery.start(plane.serve, "127.0.0.1", 0)
        manager = IdentityManager()
        await nursery.start(lambda task_status: run_client(
            ("127.0.0.1", port), NodeInfo("p", namespace="tutorial"), lambda resources, version: None,
            credentials=Credentials(root.cert_pem.bytes(), token), identity=manager, task_status=task_status))
        identity = await wait_for(lambda: manager.current, what="a certificate from the plug-in CA")
        chain = x509.load_pem_x509_certificates(identity.certificate_chain_pem)
        assert [c.subject for c in chain[1:]] == [x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()).subject]
        assert identity.trust_bundle_pem == root.cert_pem.bytes()
        nursery.cancel_scope.cancel()


async def test_a_registered_workload_carries_the_account_its_certificate_proves(tmp_path):
    """A proxy that names no service account gets `default`'s certificate; its WorkloadEntry says
    `default` too, so clients' ISTIO_MUTUAL, which accepts the service's accounts, accepts it."""
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        manager = IdentityManager()
        node = NodeInfo("ratings-1", namespace="tutorial", labels={"app": "ratings"}, address="127.0.0.9",
                        ports={"http": 9080}, register=True)
        await nursery.start(lambda task_status: run_client(
            ("127.0.0.1", port), node, lambda resources, version: None,
            credentials=Credentials(mesh.roots, mesh.tutorial_token), identity=manager, task_status=task_status))
        await wait_for(lambda: manager.current, what="the first certificate")
        assert manager.current.spiffe_id == "spiffe://cluster.local/ns/tutorial/sa/default"

        def registered():
            return [s for k, s in plane.store.state.items() if k.kind == "WorkloadEntry"] or None

        (entry,) = await wait_for(registered, what="the WorkloadEntry")
        assert entry.resource.obj.spec.service_account == "default"
        nursery.cancel_scope.cancel()
