"""TLS contexts (`TlsContext`: one OpenSSL SSL_CTX of proxy/tls/openssl.py's library) for both
directions with safe defaults, from certificate files.

Every context: TLS 1.2 at least, no renegotiation, no compression, forward-secret AEAD ciphers only
for TLS 1.2 (Istio's gateway defaults; TLS 1.3's suites are all of that kind), ALPN `h2` and
`http/1.1`. A setting that cannot be honoured is a `TlsSettingsError` naming the Istio field, so the
config layer can point at it.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from proxy.config.snapshot import CertificateFiles, ServerTls
from proxy.tls.openssl import OpenSslError, TlsLibraryError, library, log
from proxy.tls.sessions import ClientSessions

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
# key exchange groups, Envoy's default ecdhCurves and P-384 (OpenSSL 3.5+ would otherwise lead with the
# post-quantum hybrid X25519MLKEM768, which neither Envoy nor Istio offers by default and which costs
# about 45 µs more per handshake)
GROUPS = "X25519:P-256:P-384"
# TLS 1.3's suites: OpenSSL's three defaults, AES-128-GCM first (OpenSSL leads with AES-256-GCM-SHA384). The
# server chooses (SSL_OP_CIPHER_SERVER_PREFERENCE), so with a client offering OpenSSL's default order, a
# triomesh sidecar's included, the handshake's key schedule and transcript hash run on SHA-256, which the
# CPU computes with its SHA extensions, instead of SHA-384: about 4% less CPU in the server's
# SSL_do_handshake (docs/tls.md); it is TLS 1.3's mandatory suite (RFC 8446 section 9.1), and the same
# three suites stay accepted. Set on the OpenSSL fallback only: BoringSSL's suites are fixed, and it
# takes the client's order among the AES-GCM ones, as Envoy does.
TLS13_CIPHER_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
SESSION_ID_CONTEXT = b"triomesh"
# OpenSSL's SSL_MODE_NO_AUTO_CHAIN (ssl.h; the binding lacks the name): a certificate file holding only
# the leaf is sent as it is, not completed from the trust store on every handshake (see TlsContext)
_MODE_NO_AUTO_CHAIN = 0x00000008
_ALERT_HANDSHAKE_FAILURE = 40  # RFC 8446 section 6.2
_ALERT_PROTOCOL_VERSION = 70

# Istio's TLSProtocol values as OpenSSL's version numbers; TLS_AUTO means "the default" (1.2 for the
# minimum, 1.3 for the maximum)
TLS1_2 = 0x0303
TLS1_3 = 0x0304
VERSIONS = {
    "TLS_AUTO": None,
    "TLSV1_0": 0x0301,
    "TLSV1_1": 0x0302,
    "TLSV1_2": TLS1_2,
    "TLSV1_3": TLS1_3,
}
_REFUSED_VERSIONS = ("TLSV1_0", "TLSV1_1")


class TlsSettingsError(ValueError):
    """A TLS setting that cannot be used. `field` is the Istio field name (camelCase) it comes from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class ProtocolVersions:
    minimum: str = "TLS_AUTO"
    maximum: str = "TLS_AUTO"


class TlsContext:
    """One SSL_CTX: what every connection made from it shares (certificate, trust, versions,
    ciphers, ALPN, verification). The methods that load certificates are named and shaped as
    `ssl.SSLContext`'s, so code that fills either kind (proxy/identity/workload.py) is the same.

    `on_server_name` (server side): called during the handshake with the client's SNI (None
    without one); returns the TlsContext to continue with (this one or another, whose certificate
    and verification then apply) or an int, the TLS alert that refuses the handshake.
    `check_hostname` (client side): the server certificate must name the connection's
    server_hostname."""

    __slots__ = ("library", "pointer", "server_side", "check_hostname", "verify_mode", "alpn", "sessions",
                 "version_range", "on_server_name", "_server_name_callback", "_alpn_callback", "__weakref__")

    def __init__(self, *, server_side: bool) -> None:
        library_ = self.library = library()
        lib, ffi = library_.lib, library_.ffi
        pointer = lib.SSL_CTX_new(lib.TLS_server_method() if server_side else lib.TLS_client_method())
        if pointer == ffi.NULL:
            raise library_.error("SSL_CTX_new")
        self.pointer = ffi.gc(pointer, lib.SSL_CTX_free)
        self.server_side = server_side
        self.check_hostname = False
        self.verify_mode = lib.SSL_VERIFY_NONE
        self.alpn: tuple[str, ...] = ()
        # (lowest, highest) protocol version this context's own settings allow (set_versions)
        self.version_range = (TLS1_2, TLS1_3)
        # client side: the sessions its connections resume (proxy/tls/sessions.py)
        self.sessions = None if server_side else ClientSessions(library_)
        if not server_side and library_.boringssl and not lib.tm_keep_new_sessions(pointer):
            raise library_.error("tm_keep_new_sessions")
        self.on_server_name = None
        self._server_name_callback = None
        self._alpn_callback = None
        # the stdlib's options (OpenSSL's bug workarounds, no SSLv2/3, no compression, the server's
        # cipher order) and no renegotiation
        lib.SSL_CTX_set_options(self.pointer, lib.SSL_OP_ALL | lib.SSL_OP_NO_COMPRESSION | lib.SSL_OP_NO_RENEGOTIATION
                                | lib.SSL_OP_CIPHER_SERVER_PREFERENCE | lib.SSL_OP_SINGLE_ECDH_USE
                                | lib.SSL_OP_NO_SSLv2 | lib.SSL_OP_NO_SSLv3)
        if server_side:
            # a session resumed on a context that verifies clients needs one (OpenSSL refuses it
            # otherwise), as the stdlib sets
            lib.SSL_CTX_set_session_id_context(self.pointer, SESSION_ID_CONTEXT, len(SESSION_ID_CONTEXT))
        # as the stdlib does: an idle connection gives its record buffers back. No automatic chain:
        # with a certificate file holding only the leaf, OpenSSL would otherwise build the chain to
        # send from the trust store (the CA that verifies the peer) on every handshake, checking its
        # signatures (about a sixth of a mesh handshake's CPU) to add the root the peer has anyway.
        # The chain sent is the certificate file's, as Envoy sends it
        lib.SSL_CTX_set_mode(self.pointer, lib.SSL_MODE_RELEASE_BUFFERS | _MODE_NO_AUTO_CHAIN)
        if lib.SSL_CTX_set1_curves_list(self.pointer, GROUPS.encode()) != 1:
            raise library_.error("SSL_CTX_set1_curves_list")
        # BoringSSL's TLS 1.3 suites are fixed, in this order already (AES-128-GCM first where the CPU
        # has AES instructions); OpenSSL's are set
        if not library_.boringssl and lib.SSL_CTX_set_ciphersuites(self.pointer, TLS13_CIPHER_SUITES.encode()) != 1:
            raise library_.error("SSL_CTX_set_ciphersuites")

    # ---- settings

    def set_versions(self, minimum: int, maximum: int | None) -> None:
        self.version_range = (minimum, maximum or TLS1_3)
        lib = self.library.lib
        lib.SSL_CTX_set_min_proto_version(self.pointer, minimum)
        lib.SSL_CTX_set_max_proto_version(self.pointer, maximum or 0)  # 0: the highest the library has

    def accepts_version(self, version: int) -> bool:
        low, high = self.version_range
        return low <= version <= high

    def set_ciphers(self, cipher_list: str) -> None:
        """TLS 1.2's suites (TLS 1.3's are all AEAD with forward secrecy: TLS13_CIPHER_SUITES)."""
        if self.library.lib.SSL_CTX_set_cipher_list(self.pointer, cipher_list.encode()) != 1:
            raise self.library.error(cipher_list)

    def set_alpn_protocols(self, protocols) -> None:
        lib, ffi = self.library.lib, self.library.ffi
        self.alpn = tuple(protocols)
        wire = b"".join(bytes([len(p)]) + p.encode() for p in self.alpn)
        if self.server_side:
            self._alpn_callback = _alpn_selector(self.alpn)
            lib.SSL_CTX_set_alpn_select_cb(self.pointer, self._alpn_callback, ffi.NULL)
        elif lib.SSL_CTX_set_alpn_protos(self.pointer, wire, len(wire)) != 0:
            raise self.library.error("SSL_CTX_set_alpn_protos")

    def require_peer_certificate(self) -> None:
        """Verify the peer's certificate against the loaded trust; a peer without one fails."""
        lib = self.library.lib
        self._set_verify(lib.SSL_VERIFY_PEER | lib.SSL_VERIFY_FAIL_IF_NO_PEER_CERT)

    def bind_sessions(self, *settings: bytes) -> None:
        """A server's sessions resume only on a context with the same `settings` (what it presents and
        whom it trusts): the session id context, which OpenSSL and BoringSSL compare with a session's
        own on resumption, also after the SNI callback moved a connection to another server's context.
        So a session made on a SIMPLE server cannot skip a MUTUAL server's client certificate check,
        nor one made before a reload resume against a CA since removed (as Envoy's session id context
        hashes the certificates and the validation settings)."""
        digest = hashlib.sha256(b"\0".join(settings)).digest()  # SSL_MAX_SID_CTX_LENGTH is 32
        if self.library.lib.SSL_CTX_set_session_id_context(self.pointer, digest, len(digest)) != 1:
            raise self.library.error("SSL_CTX_set_session_id_context")

    def request_peer_certificate(self) -> None:
        """Ask for the peer's certificate and verify it against the loaded trust when one comes; a
        peer may send none (a server's OPTIONAL_MUTUAL)."""
        self._set_verify(self.library.lib.SSL_VERIFY_PEER)

    def _set_verify(self, mode: int) -> None:
        self.verify_mode = mode
        self.library.lib.SSL_CTX_set_verify(self.pointer, mode, self.library.ffi.NULL)

    def without_session_tickets(self) -> None:
        """No TLS 1.3 session tickets worth keeping and no server-side session cache. BoringSSL then
        sends none; OpenSSL (the fallback, whose binding has no SSL_CTX_set_num_tickets) still sends
        two small stateful tickets that find nothing to resume (79 bytes each, no key material)."""
        lib = self.library.lib
        lib.SSL_CTX_set_options(self.pointer, lib.SSL_OP_NO_TICKET)
        lib.SSL_CTX_set_session_cache_mode(self.pointer, lib.SSL_SESS_CACHE_OFF)

    def set_server_name_handler(self, handler) -> None:
        """`on_server_name` (see the class) called from OpenSSL's SNI callback."""
        lib, ffi = self.library.lib, self.library.ffi
        self.on_server_name = handler

        def server_name(ssl, alert, arg):
            name = lib.SSL_get_servername(ssl, lib.TLSEXT_NAMETYPE_host_name)
            chosen = handler(ffi.string(name).decode("ascii", "replace") if name != ffi.NULL else None)
            if isinstance(chosen, int):
                alert[0] = chosen
                return lib.SSL_TLSEXT_ERR_ALERT_FATAL
            if chosen is not self:
                if lib.SSL_session_reused(ssl):
                    # OpenSSL resumes against the first context (its tickets and cache) before this
                    # callback: a session made for another server of the port would skip this one's
                    # client certificate check. Listeners of several servers resume nothing
                    # (ListenerTls); this refuses it should one come all the same
                    alert[0] = _ALERT_HANDSHAKE_FAILURE
                    return lib.SSL_TLSEXT_ERR_ALERT_FATAL
                # the chosen server's certificate and trust (SSL_set_SSL_CTX) and its client
                # certificate requirement, which OpenSSL copied from the first context at SSL_new
                lib.SSL_set_SSL_CTX(ssl, chosen.pointer)
                lib.SSL_set_verify(ssl, chosen.verify_mode, ffi.NULL)
            if not chosen.accepts_version(lib.SSL_version(ssl)):
                # OpenSSL settled the version with the first context, before this callback: the
                # chosen server's own range decides (ListenerTls starts a connection on the right
                # context when the port's servers differ in versions; this is the guard)
                alert[0] = _ALERT_PROTOCOL_VERSION
                return lib.SSL_TLSEXT_ERR_ALERT_FATAL
            return lib.SSL_TLSEXT_ERR_OK

        self._server_name_callback = ffi.callback("int(SSL *, int *, void *)", server_name,
                                                  onerror=_report_callback_error,
                                                  error=lib.SSL_TLSEXT_ERR_ALERT_FATAL)
        lib.SSL_CTX_set_tlsext_servername_callback(self.pointer, self._server_name_callback)

    # ---- certificates (the stdlib's names and arguments)

    def load_cert_chain(self, certfile: str, keyfile: str | None = None) -> None:
        """The certificate chain (leaf first) and its private key, PEM; `keyfile` None: the key is in
        `certfile` too."""
        lib = self.library.lib
        if lib.SSL_CTX_use_certificate_chain_file(self.pointer, certfile.encode()) != 1:
            raise self.library.error("certificate chain")
        if lib.SSL_CTX_use_PrivateKey_file(self.pointer, (keyfile or certfile).encode(), lib.SSL_FILETYPE_PEM) != 1:
            raise self.library.error("private key")
        if lib.SSL_CTX_check_private_key(self.pointer) != 1:
            raise self.library.error("private key")

    def load_verify_locations(self, cafile: str | None = None, cadata: str | bytes | None = None) -> None:
        """Trust the PEM certificates of `cafile` and/or `cadata`."""
        lib, ffi = self.library.lib, self.library.ffi
        if cafile is not None and lib.SSL_CTX_load_verify_locations(self.pointer, cafile.encode(), ffi.NULL) != 1:
            raise self.library.error(cafile)
        if cadata is not None:
            data = cadata.encode("ascii") if isinstance(cadata, str) else bytes(cadata)
            store = lib.SSL_CTX_get_cert_store(self.pointer)
            bio = lib.BIO_new_mem_buf(data, len(data))
            added = 0
            try:
                while True:
                    certificate = lib.PEM_read_bio_X509(bio, ffi.NULL, ffi.NULL, ffi.NULL)
                    if certificate == ffi.NULL:
                        break
                    try:
                        lib.X509_STORE_add_cert(store, certificate)
                        added += 1
                    finally:
                        lib.X509_free(certificate)
            finally:
                lib.BIO_free(bio)
            lib.ERR_clear_error()  # the end of the data reads as an error
            if not added:
                raise OpenSslError("NO_CERTIFICATE_OR_CRL_FOUND", "no PEM certificate in the trust data")

    def load_default_certs(self) -> None:
        """The system's trust store: where the system OpenSSL keeps it (the bundled library's own
        default directory is its build machine's)."""
        paths = ssl.get_default_verify_paths()
        lib, ffi = self.library.lib, self.library.ffi
        cafile = paths.cafile.encode() if paths.cafile else ffi.NULL
        capath = paths.capath.encode() if paths.capath else ffi.NULL
        if (cafile != ffi.NULL or capath != ffi.NULL) and lib.SSL_CTX_load_verify_locations(
                self.pointer, cafile, capath) != 1:
            lib.ERR_clear_error()


# one ALPN callback per server preference list, kept for the process's life: a connection's SSL may
# outlive the TlsContext object that set it (a reload during its handshake), never the callback
_alpn_selectors: dict[tuple[str, ...], object] = {}


def _alpn_selector(alpn: tuple[str, ...]):
    selector = _alpn_selectors.get(alpn)
    if selector is not None:
        return selector
    library_ = library()
    lib, ffi = library_.lib, library_.ffi
    preference = [p.encode() for p in alpn]

    def select(ssl, out, out_length, offered, offered_length, arg):
        # ours first (server preference, as the stdlib's SSL_select_next_proto); no common
        # protocol: no ALPN in the answer, as the stdlib and Envoy do
        names = ffi.buffer(offered, offered_length)[:]
        positions = {}
        i = 0
        while i < len(names):
            size = names[i]
            positions.setdefault(names[i + 1:i + 1 + size], i + 1)
            i += 1 + size
        for protocol in preference:
            at = positions.get(protocol)
            if at is not None:
                out[0] = offered + at
                out_length[0] = len(protocol)
                return lib.SSL_TLSEXT_ERR_OK
        return lib.SSL_TLSEXT_ERR_NOACK

    selector = _alpn_selectors[alpn] = ffi.callback(
        "int(SSL *, unsigned char **, unsigned char *, unsigned char *, unsigned int, void *)", select,
        onerror=_report_callback_error, error=lib.SSL_TLSEXT_ERR_NOACK)
    return selector


def _report_callback_error(exception_type, exception, traceback) -> None:
    log.error("tls callback failed", error=repr(exception))


def tls12_cipher_names() -> frozenset[str]:
    """The TLS 1.2 cipher suite names the data path's library knows."""
    library_ = library()
    lib, ffi = library_.lib, library_.ffi
    probe = TlsContext(server_side=True)
    probe.set_ciphers("ALL:COMPLEMENTOFALL")
    ssl_pointer = lib.SSL_new(probe.pointer)
    names = []
    try:
        i = 0
        while True:
            name = lib.SSL_get_cipher_list(ssl_pointer, i)
            if name == ffi.NULL:
                break
            names.append(ffi.string(name).decode("ascii"))
            i += 1
    finally:
        lib.SSL_free(ssl_pointer)
    return frozenset(n for n in names if not n.startswith("TLS_"))  # TLS 1.3's suites are all TLS_*


_known_ciphers: frozenset[str] | None = None


# suites OpenSSL knows that no peer of a proxy could use, by a part of their name: BoringSSL (Envoy)
# has none of them either
_UNUSABLE_CIPHER_PARTS = (("NULL", "no encryption"), ("ADH-", "no authentication (anonymous)"),
                          ("AECDH-", "no authentication (anonymous)"), ("PSK", "needs a pre-shared key"),
                          ("SRP", "needs an SRP password"))


def cipher_suite_names(entries: tuple[str, ...]) -> tuple[str, ...]:
    """OpenSSL's cipher names for `cipherSuites` entries, in order. An entry is one name, or Envoy's
    equal-preference group `[A|B]` (BoringSSL syntax, which Istio passes on): OpenSSL has no such
    groups, so its names go in as written, one after the other."""
    names: list[str] = []
    for entry in entries:
        names.extend(entry[1:-1].split("|") if entry.startswith("[") and entry.endswith("]") else (entry,))
    return tuple(names)


def check_cipher_suites(entries: tuple[str, ...]) -> None:
    """Each entry must be one OpenSSL cipher suite name this OpenSSL knows, or a group of them (as Istio
    checks names, not OpenSSL's cipher-list expressions), and one a proxy can use."""
    global _known_ciphers
    if _known_ciphers is None:
        _known_ciphers = tls12_cipher_names()
    for i, entry in enumerate(entries):
        for name in cipher_suite_names((entry,)):
            # refused by what it is first: a library without such suites (BoringSSL) would call it unknown
            unusable = next((why for part, why in _UNUSABLE_CIPHER_PARTS if part in name), None)
            if unusable is not None:
                raise TlsSettingsError(f"cipherSuites[{i}]", f"cipher suite {name!r} is refused: {unusable}")
            if name not in _known_ciphers:
                raise TlsSettingsError(f"cipherSuites[{i}]", f"unknown cipher suite {name!r} (expected an OpenSSL "
                                                             f"name such as {DEFAULT_CIPHER_SUITES[0]!r})")


def check_versions(versions: ProtocolVersions) -> tuple[int, int | None]:
    """(minimum, maximum or None) from Istio's names; below TLS 1.2 is refused."""
    for field, value in (("minProtocolVersion", versions.minimum), ("maxProtocolVersion", versions.maximum)):
        if value not in VERSIONS:
            raise TlsSettingsError(field, f"unknown TLS version {value!r} (expected one of {', '.join(VERSIONS)})")
        if value in _REFUSED_VERSIONS:
            raise TlsSettingsError(field, f"{value} is refused: triomesh speaks TLS 1.2 and 1.3 only "
                                          "(older versions are broken, RFC 8996)")
    minimum = VERSIONS[versions.minimum] or TLS1_2
    maximum = VERSIONS[versions.maximum]
    if maximum is not None and maximum < minimum:
        raise TlsSettingsError("maxProtocolVersion", f"maxProtocolVersion {versions.maximum} is below "
                                                     f"minProtocolVersion {versions.minimum}")
    return minimum, maximum


def _base(server_side: bool, versions: ProtocolVersions, cipher_suites: tuple[str, ...],
          alpn: tuple[str, ...]) -> TlsContext:
    minimum, maximum = check_versions(versions)
    if cipher_suites:
        check_cipher_suites(cipher_suites)
    try:
        context = TlsContext(server_side=server_side)
    except (TlsLibraryError, ImportError) as e:  # a context cannot be made at all: said where it is used
        raise TlsSettingsError("tls", f"no usable TLS library: {e}") from e
    context.set_versions(minimum, maximum)
    try:
        context.set_ciphers(":".join(cipher_suite_names(cipher_suites) or DEFAULT_CIPHER_SUITES))
    except OpenSslError as e:
        raise TlsSettingsError("cipherSuites", f"no usable cipher suite in {list(cipher_suites)}: {e}") from e
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def base_context(server_side: bool, alpn: tuple[str, ...], versions: ProtocolVersions = ProtocolVersions(),
                 cipher_suites: tuple[str, ...] = ()) -> TlsContext:
    """A context with the safe defaults and nothing loaded (mesh mTLS loads the workload identity)."""
    return _base(server_side, versions, cipher_suites, alpn)


def _readable(field: str, path: str) -> None:
    """OpenSSL's errors do not say which file is missing: look first, to name the field."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TlsSettingsError(field, f"cannot read {path}: {e.strerror}") from e


def _load_chain(context: TlsContext, cert_field: str, cert_file: str, key_file: str, ca_file: str | None) -> None:
    _readable(cert_field, cert_file)
    _readable("privateKey", key_file)
    try:
        context.load_cert_chain(cert_file, key_file)
    except OpenSslError as e:
        if "KEY_VALUES_MISMATCH" in e.reason:
            raise TlsSettingsError("privateKey", f"private key {key_file} does not match certificate "
                                                 f"{cert_file}") from e
        if _holds_certificates(cert_file):
            raise TlsSettingsError("privateKey", f"cannot load private key {key_file}: not a PEM private key "
                                                 f"({e.reason})") from e
        raise TlsSettingsError(cert_field, f"cannot load certificate {cert_file}: not a PEM certificate chain "
                                           f"({e.reason})") from e
    _warn_of_a_missing_issuer(cert_field, cert_file, ca_file)


# certificate file -> its content when its missing issuer was last logged: one warning per file
# content, however many contexts are made from it (config check, listener, /certs)
_warned_chains: dict[str, bytes] = {}


def _warn_of_a_missing_issuer(cert_field: str, cert_file: str, ca_file: str | None) -> None:
    """The chain sent is the file's as it is (no automatic chain, see TlsContext; Envoy sends the file
    as it is too): a file that ends with its leaf, without the leaf's issuer, fails for peers that
    hold only the root above that issuer, even when the issuer is in caCertificates. Said once, when
    the file is loaded; not when the issuer is a root in caCertificates, when there is no CA file to
    tell a root by, or when the file ends with a CA certificate (an intermediate below the root the
    peer holds: the usual chain)."""
    from cryptography import x509

    try:
        with open(cert_file, "rb") as f:
            content = f.read()
        chain = x509.load_pem_x509_certificates(content)
    except (OSError, ValueError):
        return  # OpenSSL loaded it: nothing to add
    last = chain[-1]
    missing = (last.issuer != last.subject and not _is_ca(last)
               and not any(c.subject == last.issuer for c in chain))
    in_ca_certificates = False
    if missing and not ca_file:
        # nothing to tell the issuer by: a leaf issued straight by a root (a private CA's usual chain)
        # is complete, and warning about every such file would teach users to ignore the warning
        missing = False
    if missing:
        try:
            with open(ca_file, "rb") as f:
                issuers = [c for c in x509.load_pem_x509_certificates(f.read()) if c.subject == last.issuer]
        except (OSError, ValueError):
            issuers = []
        in_ca_certificates = bool(issuers)
        missing = not any(c.issuer == c.subject for c in issuers)  # a root the peer verifies with: complete
    if not missing:
        _warned_chains.pop(cert_file, None)
        return
    if _warned_chains.get(cert_file) == content:
        return
    _warned_chains[cert_file] = content
    log.warning("tls certificate file does not hold its issuer: peers that trust only a root above it cannot "
                "verify it; the file must hold the chain, leaf first", field=cert_field, certificate=cert_file,
                missing_issuer=last.issuer.rfc4514_string(), issuer_in_ca_certificates=in_ca_certificates)


def _is_ca(certificate) -> bool:
    from cryptography import x509

    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _holds_certificates(path: str) -> bool:
    probe = TlsContext(server_side=False)
    try:
        probe.load_verify_locations(cafile=path)
    except OpenSslError:
        return False
    return True


def _load_ca(context: TlsContext, ca_file: str) -> None:
    _readable("caCertificates", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except OpenSslError as e:
        raise TlsSettingsError("caCertificates", f"no PEM certificate in {ca_file} ({e.reason})") from e


def server_context(cert_file: str, key_file: str, *, ca_file: str | None = None,
                   require_client_certificate: bool = False, request_client_certificate: bool = False,
                   versions: ProtocolVersions = ProtocolVersions(),
                   cipher_suites: tuple[str, ...] = (), alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> TlsContext:
    """A terminating context. `require_client_certificate` (Istio's MUTUAL): a client without a
    certificate signed by `ca_file` fails the handshake. `request_client_certificate` (Istio's
    OPTIONAL_MUTUAL): a client certificate is asked for and verified when one comes, and a client
    may send none."""
    context = _base(True, versions, cipher_suites, alpn)
    _load_chain(context, "serverCertificate", cert_file, key_file, ca_file)
    clients = b"require" if require_client_certificate else b"request" if request_client_certificate else b"none"
    context.bind_sessions(b"gateway", clients, _file_bytes(cert_file), _file_bytes(ca_file) if ca_file else b"")
    if require_client_certificate or request_client_certificate:
        if not ca_file:
            mode = "MUTUAL" if require_client_certificate else "OPTIONAL_MUTUAL"
            raise TlsSettingsError("caCertificates", f"{mode} mode needs caCertificates to verify clients with")
        _load_ca(context, ca_file)
        if require_client_certificate:
            context.require_peer_certificate()
        else:
            context.request_peer_certificate()
    return context


def _file_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return path.encode()  # unreadable here: its loading names the error


def client_context(*, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                   verify: bool = True, check_hostname: bool = True, versions: ProtocolVersions = ProtocolVersions(),
                   cipher_suites: tuple[str, ...] = (), alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> TlsContext:
    """An originating context. Without `ca_file` the system's trust store verifies the server;
    `verify=False` is Istio's insecureSkipVerify. `cert_file`/`key_file`: a client certificate (MUTUAL)."""
    context = _base(False, versions, cipher_suites, alpn)
    if verify:
        context.check_hostname = check_hostname
        if ca_file:
            _load_ca(context, ca_file)
        else:
            context.load_default_certs()
        context.require_peer_certificate()
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise TlsSettingsError("clientCertificate" if not cert_file else "privateKey",
                                   "a client certificate needs both clientCertificate and privateKey")
        _load_chain(context, "clientCertificate", cert_file, key_file, ca_file)
    return context


def context_for_server(server: ServerTls, files: CertificateFiles | None = None,
                       alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> TlsContext:
    """The context of a compiled terminating Gateway server (TlsSettingsError when its files or
    settings fail). `files`: where its certificate source has the certificate now (default: the
    files the config names)."""
    files = files if files is not None else server.certificate
    return server_context(files.cert_file, files.key_file, ca_file=files.ca_file or None,
                          require_client_certificate=server.mode == "MUTUAL",
                          request_client_certificate=server.mode == "OPTIONAL_MUTUAL",
                          versions=ProtocolVersions(server.min_protocol_version, server.max_protocol_version),
                          cipher_suites=server.cipher_suites, alpn=alpn)

