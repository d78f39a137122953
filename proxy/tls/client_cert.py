"""The `x-forwarded-client-cert` (XFCC) element of one mutual TLS connection, as Envoy writes it.

An element is `;`-joined `Key=value` pairs, in Envoy's order: `By=` each URI SAN of our own
certificate, `Hash=` the hex SHA-256 of the client certificate (DER), then the details a listener
asks for in the order `Cert`, `Subject`, `URI`, `DNS`:

- `Cert="..."`: the client certificate as PEM, URL-encoded as Envoy does it (newline, space, `+`, `/`
  and `=` as %XX), on a Gateway only;
- `Subject="..."`: the certificate's subject in RFC 2253 form, printed by BoringSSL's own
  `X509_NAME_print_ex(XN_FLAG_RFC2253)` as Envoy prints it (last RDN first, short attribute names,
  `,+"\\<>;` escaped, control and non-ASCII bytes as `\\XX`, unknown attribute types as `#` and their
  DER in hex); present even when empty, as a mesh workload certificate's is. On the OpenSSL
  fallback it is written from `cryptography`'s parse, the same for the common attribute types;
- `URI=` each URI SAN (`URI=` alone when there is none);
- `DNS=` each DNS SAN (nothing when there is none).

So a sidecar's inbound request from another sidecar carries
`By=spiffe://td/ns/a/sa/server;Hash=...;Subject="";URI=spiffe://td/ns/b/sa/client`.

An element is made once per certificate pair and listener kind (a peer reconnecting with the same
certificate reuses it), and once per connection at most (the DownstreamPeer keeps it). Control
characters in a SAN (a CA's business, but never a header's) are written as %XX so a value cannot end
a header line.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Callable

_CACHE_SIZE = 256
_cache: dict[tuple[bytes, bytes, bool], bytes] = {}

# OpenSSL's short names where cryptography's RFC 4514 writer would print a dotted OID
_SHORT_NAMES: dict | None = None


def _short_names() -> dict:
    global _SHORT_NAMES
    if _SHORT_NAMES is None:
        from cryptography.x509.oid import NameOID

        _SHORT_NAMES = {
            NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.SERIAL_NUMBER: "serialNumber", NameOID.TITLE: "title",
            NameOID.GIVEN_NAME: "GN", NameOID.SURNAME: "SN", NameOID.INITIALS: "initials",
            NameOID.GENERATION_QUALIFIER: "generationQualifier", NameOID.DN_QUALIFIER: "dnQualifier",
            NameOID.PSEUDONYM: "pseudonym", NameOID.BUSINESS_CATEGORY: "businessCategory",
            NameOID.POSTAL_CODE: "postalCode", NameOID.STREET_ADDRESS: "street",
        }
    return _SHORT_NAMES


def subject_rfc2253(certificate) -> str:
    """The subject of a `cryptography` certificate as OpenSSL's XN_FLAG_RFC2253 prints it."""
    text = certificate.subject.rfc4514_string(_short_names())
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else "".join(f"\\{b:02X}" for b in c.encode("utf-8"))
                   for c in text)


def url_encoded_pem(der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    pem = f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"
    return pem.replace("\n", "%0A").replace(" ", "%20").replace("+", "%2B") \
        .replace("/", "%2F").replace("=", "%3D")


def _header_safe(value: str) -> str:
    if value.isprintable() and value.isascii():
        return value
    return "".join(c if c.isprintable() and c.isascii() else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
                   for c in value)


def client_cert_element(peer_der: bytes, local_der: bytes | None, with_cert: bool,
                        subject: Callable[[], str | None] | None = None) -> bytes:
    """The XFCC element of a connection whose client presented `peer_der`, served with our
    certificate `local_der` (None: none, as on no TLS server); `with_cert`: a Gateway's element,
    with the client certificate itself. `subject`: asked (only when the element is not cached yet)
    for the subject as the TLS library prints it (BoringSSL's own RFC 2253 printing, Envoy's);
    without it, or when it says None, the subject is written from `cryptography`'s parse."""
    key = (peer_der, local_der or b"", with_cert)
    element = _cache.get(key)
    if element is not None:
        return element
    from proxy.tls.conn import subject_alt_names  # the same parse (and cache) the principal reads

    parts = []
    if local_der:
        parts.extend(f"By={_header_safe(uri)}" for kind, uri in subject_alt_names(local_der) if kind == "URI")
    parts.append(f"Hash={hashlib.sha256(peer_der).hexdigest()}")
    if with_cert:
        parts.append(f'Cert="{url_encoded_pem(peer_der)}"')
    printed = subject() if subject is not None else None
    if printed is None:
        from cryptography import x509

        printed = subject_rfc2253(x509.load_der_x509_certificate(peer_der))
    parts.append(f'Subject="{_header_safe(printed)}"')
    names = subject_alt_names(peer_der)
    uris = [uri for kind, uri in names if kind == "URI"]
    parts.extend(f"URI={_header_safe(uri)}" for uri in uris) if uris else parts.append("URI=")
    parts.extend(f"DNS={_header_safe(name)}" for kind, name in names if kind == "DNS")
    element = ";".join(parts).encode("ascii")
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[key] = element
    return element
