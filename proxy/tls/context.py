"""`ssl.SSLContext`s for both directions with safe defaults, from certificate files.

Every context: TLS 1.2 at least, no renegotiation, no compression, forward-secret AEAD ciphers only
for TLS 1.2 (Istio's gateway defaults; TLS 1.3's suites are all of that kind), ALPN `h2` and
`http/1.1`. A setting that cannot be honoured is a `TlsSettingsError` naming the Istio field, so the
config layer can point at it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from proxy.config.snapshot import CertificateFiles, ServerTls

# Istio's default cipher suites for gateways and sidecars (ECDHE key exchange, AEAD only), in
# OpenSSL's names
DEFAULT_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
ALPN_PROTOCOLS = ("h2", "http/1.1")

# Istio's TLSProtocol values; TLS_AUTO means "the default" (1.2 for the minimum, 1.3 for the maximum)
VERSIONS = {
    "TLS_AUTO": None,
    "TLSV1_0": ssl.TLSVersion.TLSv1,
    "TLSV1_1": ssl.TLSVersion.TLSv1_1,
    "TLSV1_2": ssl.TLSVersion.TLSv1_2,
    "TLSV1_3": ssl.TLSVersion.TLSv1_3,
}
_REFUSED_VERSIONS = ("TLSV1_0", "TLSV1_1")

_SAFE_OPTIONS = (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
                 | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3)


class TlsSettingsError(ValueError):
    """A TLS setting that cannot be used. `field` is the Istio field name (camelCase) it comes from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ProtocolVersions:
    minimum: str = "TLS_AUTO"
    maximum: str = "TLS_AUTO"


def _tls12_cipher_names() -> frozenset[str]:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.set_ciphers("ALL:COMPLEMENTOFALL")
    return frozenset(c["name"] for c in probe.get_ciphers() if c["protocol"] != "TLSv1.3")


def check_cipher_suites(names: tuple[str, ...]) -> None:
    """Each entry must be one OpenSSL cipher suite name this OpenSSL knows (as Istio checks names,
    not OpenSSL's cipher-list expressions)."""
    known = _tls12_cipher_names()
    for i, name in enumerate(names):
        if name not in known:
            raise TlsSettingsError(f"cipherSuites[{i}]", f"unknown cipher suite {name!r} (expected an OpenSSL "
                                                         f"name such as {DEFAULT_CIPHER_SUITES[0]!r})")


def check_versions(versions: ProtocolVersions) -> tuple[ssl.TLSVersion, ssl.TLSVersion | None]:
    """(minimum, maximum or None) from Istio's names; below TLS 1.2 is refused."""
    for field, value in (("minProtocolVersion", versions.minimum), ("maxProtocolVersion", versions.maximum)):
        if value not in VERSIONS:
            raise TlsSettingsError(field, f"unknown TLS version {value!r} (expected one of {', '.join(VERSIONS)})")
        if value in _REFUSED_VERSIONS:
            raise TlsSettingsError(field, f"{value} is refused: triomesh speaks TLS 1.2 and 1.3 only "
                                          "(older versions are broken, RFC 8996)")
    minimum = VERSIONS[versions.minimum] or ssl.TLSVersion.TLSv1_2
    maximum = VERSIONS[versions.maximum]
    if maximum is not None and maximum < minimum:
        raise TlsSettingsError("maxProtocolVersion", f"maxProtocolVersion {versions.maximum} is below "
                                                     f"minProtocolVersion {versions.minimum}")
    return minimum, maximum


def _base(purpose: int, versions: ProtocolVersions, cipher_suites: tuple[str, ...],
          alpn: tuple[str, ...]) -> ssl.SSLContext:
    minimum, maximum = check_versions(versions)
    if cipher_suites:
        check_cipher_suites(cipher_suites)
    context = ssl.SSLContext(purpose)
    context.options |= _SAFE_OPTIONS
    context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    try:
        context.set_ciphers(":".join(cipher_suites or DEFAULT_CIPHER_SUITES))
    except ssl.SSLError as e:
        raise TlsSettingsError("cipherSuites", f"no usable cipher suite in {list(cipher_suites)}: {e}") from e
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def base_context(purpose: int, alpn: tuple[str, ...], versions: ProtocolVersions = ProtocolVersions(),
                 cipher_suites: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A context with the safe defaults and nothing loaded (mesh mTLS loads the workload identity)."""
    return _base(purpose, versions, cipher_suites, alpn)


def _readable(field: str, path: str) -> None:
    """OpenSSL's errors do not say which file is missing: look first, to name the field."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TlsSettingsError(field, f"cannot read {path}: {e.strerror}") from e


def _load_chain(context: ssl.SSLContext, cert_field: str, cert_file: str, key_file: str) -> None:
    _readable(cert_field, cert_file)
    _readable("privateKey", key_file)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise TlsSettingsError("privateKey", f"private key {key_file} does not match certificate "
                                                 f"{cert_file}") from e
        if _holds_certificates(cert_file):
            raise TlsSettingsError("privateKey", f"cannot load private key {key_file}: not a PEM private key "
                                                 f"({e.reason or e})") from e
        raise TlsSettingsError(cert_field, f"cannot load certificate {cert_file}: not a PEM certificate chain "
                                           f"({e.reason or e})") from e
    except OSError as e:  # gone between the look and the load
        raise TlsSettingsError(cert_field, f"cannot read {cert_file} or {key_file}: {e.strerror}") from e


def _holds_certificates(path: str) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    _readable("caCertificates", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as e:
        raise TlsSettingsError("caCertificates", f"no PEM certificate in {ca_file} ({e.reason or e})") from e
    except OSError as e:
        raise TlsSettingsError("caCertificates", f"cannot read {ca_file}: {e.strerror}") from e


def record_server_name(ssl_object, server_name: str | None, context: ssl.SSLContext) -> None:
    """SNI callback: keep the name the client asked for on its SSLObject (TlsConn.server_name)."""
    ssl_object.sni = server_name


def server_context(cert_file: str, key_file: str, *, ca_file: str | None = None,
                   require_client_certificate: bool = False, versions: ProtocolVersions = ProtocolVersions(),
                   cipher_suites: tuple[str, ...] = (), alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    """A terminating context. `require_client_certificate` (Istio's MUTUAL): a client without a
    certificate signed by `ca_file` fails the handshake."""
    context = _base(ssl.PROTOCOL_TLS_SERVER, versions, cipher_suites, alpn)
    context.sni_callback = record_server_name
    _load_chain(context, "serverCertificate", cert_file, key_file)
    if require_client_certificate:
        if not ca_file:
            raise TlsSettingsError("caCertificates", "MUTUAL mode needs caCertificates to verify clients with")
        _load_ca(context, ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(*, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                   verify: bool = True, check_hostname: bool = True, versions: ProtocolVersions = ProtocolVersions(),
                   cipher_suites: tuple[str, ...] = (), alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    """An originating context. Without `ca_file` the system's trust store verifies the server;
    `verify=False` is Istio's insecureSkipVerify. `cert_file`/`key_file`: a client certificate (MUTUAL)."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, versions, cipher_suites, alpn)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = check_hostname
        if ca_file:
            _load_ca(context, ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise TlsSettingsError("clientCertificate" if not cert_file else "privateKey",
                                   "a client certificate needs both clientCertificate and privateKey")
        _load_chain(context, "clientCertificate", cert_file, key_file)
    return context


def context_for_server(server: ServerTls, files: CertificateFiles | None = None,
                       alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    """The context of a compiled terminating Gateway server (TlsSettingsError when its files or
    settings fail). `files`: where its certificate source has the certificate now (default: the
    files the config names)."""
    files = files if files is not None else server.certificate
    return server_context(files.cert_file, files.key_file, ca_file=files.ca_file or None,
                          require_client_certificate=server.mode == "MUTUAL",
                          versions=ProtocolVersions(server.min_protocol_version, server.max_protocol_version),
                          cipher_suites=server.cipher_suites, alpn=alpn)
