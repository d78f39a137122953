"""Gateway `servers[].tls` checked and compiled: which mode a server runs in, and for a terminating
server (SIMPLE, MUTUAL) its certificate, versions and ciphers as a `ServerTls`.

The certificate files are read here once (a context is built and dropped), so a missing file, an
unreadable key, a key that does not match its certificate or an unknown cipher is a config error at
the field that names it, and the proxy keeps its last good config.
"""

from __future__ import annotations

from proxy.config.istio import Server, ServerTLSSettings
from proxy.config.load import Resource
from proxy.config.snapshot import CertificateFiles, ServerTls
from proxy.tls.certificates import WORKLOAD_CERTIFICATE, CredentialError, resolve_credential
from proxy.tls.context import (
    ProtocolVersions,
    TlsSettingsError,
    check_cipher_suites,
    check_versions,
    context_for_server,
)

TERMINATE = "terminate"  # HTTPS in SIMPLE, MUTUAL: TLS ends here, HTTP follows
TERMINATE_TCP = "terminate_tcp"  # TLS in SIMPLE, MUTUAL: TLS ends here, TCP follows (tcp routes)
PASSTHROUGH = "passthrough"  # SNI routing to VirtualService tls routes, the bytes untouched
PLAIN = "plain"  # no TLS (an HTTP server, perhaps with httpsRedirect)

_TLS_PROTOCOLS = ("HTTPS", "TLS")
_FIELD = {"serverCertificate": "serverCertificate", "clientCertificate": "serverCertificate",
          "privateKey": "privateKey", "caCertificates": "caCertificates"}


def server_kind(r: Resource, path: str, server: Server) -> str:
    """TERMINATE, PASSTHROUGH or PLAIN for a server, or a ConfigError where Istio's rules say no."""
    protocol = str(server.port.protocol)
    tls = server.tls
    if protocol in _TLS_PROTOCOLS:
        if tls is None:
            raise r.error(f"{path}.tls", f"a {protocol} server needs tls settings (mode SIMPLE, MUTUAL or PASSTHROUGH)")
        if tls.mode == "PASSTHROUGH":
            return PASSTHROUGH
        return TERMINATE_TCP if protocol == "TLS" else TERMINATE
    if tls is not None and _sets_more_than_redirect(tls):
        raise r.error(f"{path}.tls", f"a {protocol} server is plaintext: its tls may only set httpsRedirect "
                                     "(use protocol HTTPS to terminate TLS)")
    return PLAIN


def _sets_more_than_redirect(tls: ServerTLSSettings) -> bool:
    return (tls.mode != "PASSTHROUGH" or bool(tls.server_certificate or tls.private_key or tls.ca_certificates
                                              or tls.credential_name or tls.cipher_suites)
            or tls.min_protocol_version != "TLS_AUTO" or tls.max_protocol_version != "TLS_AUTO")


def server_names(server_hosts: list[tuple[str, str]]) -> tuple[str, ...]:
    """The SNI a server answers, from its `hosts` (namespace/ prefixes dropped); ("*",) for any."""
    names = tuple(dict.fromkeys(h.lower() for _, h in server_hosts))
    return ("*",) if "*" in names else names


def _istio_mutual(r: Resource, path: str, tls: ServerTLSSettings, names: tuple[str, ...], listener: str) -> ServerTls:
    """ISTIO_MUTUAL: the proxy's workload certificate, clients verified against the mesh trust bundle
    (proxy/tls/mesh.py); certificate fields would contradict it."""
    tpath = f"{path}.tls"
    for field, value in (("serverCertificate", tls.server_certificate), ("privateKey", tls.private_key),
                         ("caCertificates", tls.ca_certificates), ("credentialName", tls.credential_name)):
        if value:
            raise r.error(f"{tpath}.{field}", f"mode ISTIO_MUTUAL uses the workload certificate from the mesh CA: "
                                              f"{field} must be empty (use MUTUAL for certificates of your own)")
    try:
        check_versions(ProtocolVersions(tls.min_protocol_version, tls.max_protocol_version))
        if tls.cipher_suites:
            check_cipher_suites(tuple(tls.cipher_suites))
    except TlsSettingsError as e:
        raise r.error(f"{tpath}.{e.field}", str(e)) from e
    return ServerTls(names, tls.mode, CertificateFiles("", "", "", WORKLOAD_CERTIFICATE), tls.min_protocol_version,
                     tls.max_protocol_version, tuple(tls.cipher_suites), listener, f"Gateway {r.namespace}/{r.name} {path}")


def compile_server_tls(r: Resource, path: str, tls: ServerTLSSettings, names: tuple[str, ...],
                       credentials_dir: str | None, listener: str, *, read_certificates: bool = True) -> ServerTls:
    """A terminating server's TLS, its files loaded once to check them. `read_certificates` False
    (a control plane checking config for proxies whose files it cannot see): only the settings are
    checked, and a credentialName stays unresolved."""
    tpath = f"{path}.tls"
    mutual = tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL")  # both verify client certificates with a CA
    if tls.mode == "ISTIO_MUTUAL":
        return _istio_mutual(r, path, tls, names, listener)
    if tls.credential_name and not read_certificates:
        if tls.server_certificate or tls.private_key:
            raise r.error(f"{tpath}.credentialName", "credentialName and serverCertificate/privateKey exclude each other")
        files = CertificateFiles("", "", tls.ca_certificates, origin=f"credentialName {tls.credential_name}")
    elif tls.credential_name:
        if tls.server_certificate or tls.private_key:
            raise r.error(f"{tpath}.credentialName", "credentialName and serverCertificate/privateKey exclude each other")
        try:
            files = resolve_credential(credentials_dir, tls.credential_name, need_ca=mutual and not tls.ca_certificates)
        except CredentialError as e:
            raise r.error(f"{tpath}.credentialName", str(e)) from e
        if tls.ca_certificates:
            files = CertificateFiles(files.cert_file, files.key_file, tls.ca_certificates, files.origin)
    else:
        if not tls.server_certificate:
            raise r.error(f"{tpath}.serverCertificate", f"mode {tls.mode} needs serverCertificate and privateKey, "
                                                        "or credentialName")
        if not tls.private_key:
            raise r.error(f"{tpath}.privateKey", f"mode {tls.mode} needs privateKey with serverCertificate")
        if mutual and not tls.ca_certificates:
            raise r.error(f"{tpath}.caCertificates", f"mode {tls.mode} needs caCertificates to verify client certificates with")
        files = CertificateFiles(tls.server_certificate, tls.private_key, tls.ca_certificates if mutual else "", "files")
    versions = ProtocolVersions(tls.min_protocol_version, tls.max_protocol_version)
    compiled = ServerTls(names, tls.mode, files, tls.min_protocol_version, tls.max_protocol_version,
                         tuple(tls.cipher_suites), listener, f"Gateway {r.namespace}/{r.name} {path}")
    try:
        check_versions(versions)
        if tls.cipher_suites:
            check_cipher_suites(tuple(tls.cipher_suites))
        if read_certificates:
            context_for_server(compiled)
    except TlsSettingsError as e:
        field = e.field
        if tls.credential_name and field in _FIELD and not (field == "caCertificates" and tls.ca_certificates):
            field = "credentialName"
        raise r.error(f"{tpath}.{field}", str(e)) from e
    return compiled
