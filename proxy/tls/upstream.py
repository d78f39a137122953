"""TLS the proxy originates to upstreams: one `TlsContext` per distinct `UpstreamTls`, and the
handshake step of `open_connection` with its checks (SNI, subjectAltNames) and failure reasons.

Contexts are cached by the setting and its files' fingerprint (proxy/tls/certificates.py), and
asked for when a snapshot's cluster runtime is made, never per request or connection: a new snapshot
picks up rewritten certificate files, equal settings share one context.

The client certificate comes from a `CertificateSource` (files today); the mesh CA's workload
certificate (ISTIO_MUTUAL) will be another source with the same interface.
"""

from __future__ import annotations

from functools import lru_cache

from proxy.config.snapshot import CertificateFiles, UpstreamTls
from proxy.tls.certificates import certificate_source
from proxy.tls.conn import TlsHandshakeError
from proxy.tls.context import TlsContext, client_context


def _source(tls: UpstreamTls):
    return certificate_source(CertificateFiles(tls.cert_file, tls.key_file, tls.ca_file,
                                               "clientCertificate" if tls.cert_file else "caCertificates"))


def client_context_for(tls: UpstreamTls, cached: bool = True) -> TlsContext:
    """The context for `tls` (TlsSettingsError naming the field when a file or setting fails)."""
    if not cached:
        return _build(tls)
    return _cached(tls, _source(tls).fingerprint())


@lru_cache(maxsize=128)
def _cached(tls: UpstreamTls, fingerprint: tuple) -> TlsContext:
    return _build(tls)


def _build(tls: UpstreamTls) -> TlsContext:
    # subjectAltNames replace the hostname check (Envoy's match_typed_subject_alt_names); the chain
    # is still verified against caCertificates or the system store
    return client_context(ca_file=tls.ca_file or None, cert_file=tls.cert_file or None, key_file=tls.key_file or None,
                          verify=not tls.insecure_skip_verify,
                          check_hostname=not tls.subject_alt_names, alpn=tls.alpn)


def _san_matches(wanted: str, kind: str, san: str) -> bool:
    if wanted == san:
        return True
    if kind != "DNS":
        return False
    # DNS names compare without case (RFC 4343), as Envoy's dnsNameMatch does; a certificate's
    # wildcard name covers one label, as in hostname verification (RFC 6125 6.4.3)
    wanted, san = wanted.lower(), san.lower()
    if wanted == san:
        return True
    if san.startswith("*.") and "." in wanted:
        return wanted.split(".", 1)[1] == san[2:]
    return False


def check_subject_alt_names(tls: UpstreamTls, peer: dict | None) -> None:
    """After the handshake: one of the configured subjectAltNames must be among the certificate's
    DNS, URI or IP SANs (TlsHandshakeError reason `fail_verify_san`, Envoy's stat word otherwise)."""
    if not tls.subject_alt_names or tls.insecure_skip_verify:
        return
    names = [(kind, value) for kind, value in (peer or {}).get("subjectAltName", ()) if kind in ("DNS", "URI", "IP Address")]
    for wanted in tls.subject_alt_names:
        if any(_san_matches(wanted, kind, san) for kind, san in names):
            return
    sans = [value for _, value in names]
    raise TlsHandshakeError(f"upstream certificate SANs {sans} match none of subjectAltNames "
                            f"{list(tls.subject_alt_names)}", "fail_verify_san")
