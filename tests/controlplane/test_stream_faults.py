"""A fault while serving one proxy's stream costs that stream only: malformed certificate requests
are refused with BAD_CSR, and an unexpected exception (a bug) ends its stream, is logged and counted,
and the control plane keeps serving every other proxy. In process, over TLS on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.framed import StreamClosed, connect
from controlplane.wire import CertificateReply, CertificateRequest, Error, Hello, Welcome
from cp_harness import next_snapshot
from proxy.identity.csr import new_key_and_request
from proxy.identity.spiffe import SpiffeId
from test_secure_stream import Mesh, Spying, first_reply

REVIEWS = SpiffeId.of("cluster.local", "tutorial", "reviews")
SAN_OID_DER = bytes.fromhex("0603551d11")  # OBJECT IDENTIFIER 2.5.29.17 (subjectAltName)
PLACEHOLDER_OID_DER = bytes.fromhex("0603551d63")  # 2.5.29.99: same length, so it can be patched in place


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _csr_with_san_patched_in(extra: x509.ExtensionType | None, placeholder_value: bytes) -> bytes:
    """A correctly signed CSR whose extension 2.5.29.99 is renamed subjectAltName after building
    (`cryptography` would not build a bad one): the request is re-signed, so only the extension is wrong."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), placeholder_value),
                                    critical=False)
    tbs = builder.sign(key, hashes.SHA256()).tbs_certrequest_bytes.replace(PLACEHOLDER_OID_DER, SAN_OID_DER)
    ecdsa_with_sha256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
    signature = _der(0x03, b"\x00" + key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    der = _der(0x30, tbs + ecdsa_with_sha256 + signature)
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def san_that_does_not_decode() -> bytes:
    return _csr_with_san_patched_in(None, b"\x04\x00")  # an OCTET STRING where GeneralNames belong


def san_twice() -> bytes:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(REVIEWS.uri)])
    return _csr_with_san_patched_in(san, san.public_bytes())


async def _admitted(mesh: Mesh, port: int, node_id: str):
    framed = await connect("127.0.0.1", port, tls=mesh.context())
    welcome = await first_reply(framed, Hello(node_id=node_id, namespace="tutorial", service_account="reviews",
                                              token=mesh.tutorial_token))
    assert isinstance(welcome, Welcome), welcome
    await next_snapshot(framed)
    return framed


async def _reply(framed):
    with trio.fail_after(5):
        while True:
            message = await framed.receive()
            if isinstance(message, (CertificateReply, Error)):
                return message


@pytest.mark.parametrize("csr, text", [
    (san_that_does_not_decode, "the request's extensions cannot be read"),
    (san_twice, "carries extension 2.5.29.17 more than once"),
], ids=["san-not-decodable", "san-twice"])
async def test_a_csr_whose_extensions_cannot_be_read_is_refused_and_the_stream_goes_on(tmp_path, csr, text):
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery)
        framed = await _admitted(mesh, port, "reviews-1")
        await framed.send(CertificateRequest(request_id=1, csr=csr()))
        reply = await _reply(framed)
        assert isinstance(reply, CertificateReply) and reply.error_code == "BAD_CSR" and text in reply.error
        # the same stream still gets a certificate for a good request
        await framed.send(CertificateRequest(request_id=2, csr=new_key_and_request(REVIEWS).csr_pem))
        reply = await _reply(framed)
        assert isinstance(reply, CertificateReply) and reply.error_code == "" and reply.certificate_chain
        other = await _admitted(mesh, port, "reviews-2")
        assert plane.streams_failed == 0
        await other.aclose()
        await framed.aclose()
        nursery.cancel_scope.cancel()


class Faulty(Spying):
    """The real control plane with a bug planted where a proxy's input reaches it: in the work a
    certificate request runs in the stream's task, and in the shared receiver's message handler."""

    def _on_message(self, proxy, framed, message):
        if isinstance(message, CertificateRequest) and message.request_id == 666:
            raise KeyError("planted in the message handler")
        return super()._on_message(proxy, framed, message)

    async def _sign(self, proxy, framed, request):
        if request.request_id == 13:
            raise RuntimeError("planted in the signing work")
        await super()._sign(proxy, framed, request)


@pytest.mark.parametrize("request_id", [13, 666], ids=["in-stream-task", "in-receiver"])
async def test_an_unexpected_exception_ends_that_stream_only(tmp_path, request_id):
    mesh = Mesh(tmp_path)
    async with trio.open_nursery() as nursery:
        plane, port = await mesh.start(nursery, Faulty)
        bystander = await _admitted(mesh, port, "reviews-1")
        victim = await _admitted(mesh, port, "reviews-2")
        await victim.send(CertificateRequest(request_id=request_id, csr=san_twice()))
        reply = await _reply(victim)
        assert isinstance(reply, Error) and reply.code == "INTERNAL"
        with pytest.raises(StreamClosed):
            with trio.fail_after(5):
                while True:
                    await victim.receive()
        assert plane.streams_failed == 1
        # the other proxy's stream and new proxies are served as before
        await bystander.send(CertificateRequest(request_id=1, csr=new_key_and_request(REVIEWS).csr_pem))
        reply = await _reply(bystander)
        assert isinstance(reply, CertificateReply) and reply.certificate_chain
        again = await _admitted(mesh, port, "reviews-3")
        await again.aclose()
        await bystander.aclose()
        nursery.cancel_scope.cancel()
