"""The one TLS library of the data path, with its checks and its error queue as text: BoringSSL
built with clang and its assembly, through our own cffi binding (native/build_boringssl.py, which
`make test`, `demo` and `bench` run), or, where that build is missing, the OpenSSL that `cryptography`'s wheels link
statically, through cryptography's binding.

Why BoringSSL: a new mutual TLS connection is mostly the library's handshake, and BoringSSL's costs
the server about 230 µs where OpenSSL 4's costs about 450 µs (the system's OpenSSL 3.0: about 700);
docs/tls.md has the figures. Why not the stdlib's `ssl` at all: it links the system OpenSSL 3.0. The
library is loaded on first use, so a proxy that serves no TLS never loads it.
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger("triomesh.tls")

MINIMUM_VERSION_NUMBER = 0x30200000
MINIMUM_VERSION_TEXT = "3.2"
# the largest ciphertext or plaintext moved by one cffi call: a whole 64 KiB read or write and its
# record overhead fit, so the common case is one call
SCRATCH_BYTES = 128 * 1024
# what the data path calls; cryptography trims its binding now and then, so a missing one is named at load
REQUIRED_FUNCTIONS = (
    "SSL_CTX_new", "SSL_CTX_free", "TLS_server_method", "TLS_client_method", "SSL_CTX_set_options", "SSL_CTX_set_mode",
    "SSL_CTX_set1_curves_list", "SSL_CTX_set_min_proto_version", "SSL_CTX_set_max_proto_version",
    "SSL_CTX_set_cipher_list", "SSL_CTX_set_alpn_select_cb", "SSL_CTX_set_alpn_protos",
    "SSL_CTX_set_verify",
    "SSL_CTX_set_session_cache_mode", "SSL_CTX_set_session_id_context", "SSL_CTX_set_tlsext_servername_callback",
    "SSL_session_reused", "SSL_CTX_use_certificate_chain_file",
    "SSL_CTX_use_PrivateKey_file", "SSL_CTX_check_private_key", "SSL_CTX_load_verify_locations",
    "SSL_CTX_get_cert_store", "X509_STORE_add_cert", "PEM_read_bio_X509", "BIO_new_mem_buf", "SSL_new", "SSL_free",
    "SSL_set_bio", "SSL_set_accept_state", "SSL_set_connect_state", "SSL_set_tlsext_host_name", "SSL_get0_param",
    "X509_VERIFY_PARAM_set1_host", "X509_VERIFY_PARAM_set1_ip", "X509_VERIFY_PARAM_set_hostflags",
    "SSL_do_handshake", "SSL_read", "SSL_write", "SSL_pending", "SSL_shutdown", "SSL_get_error", "SSL_set_SSL_CTX",
    "SSL_set_verify", "SSL_get_servername", "SSL_get0_alpn_selected", "SSL_get_version", "SSL_version", "SSL_get_verify_mode",
    "SSL_get_verify_result", "SSL_get_peer_certificate", "SSL_get_certificate", "SSL_get_current_cipher", "SSL_CIPHER_get_name",
    "SSL_get_cipher_list", "i2d_X509_bio", "X509_free",
    "X509_verify_cert_error_string", "BIO_new", "BIO_s_mem", "BIO_read", "BIO_write", "BIO_free",
    "BIO_get_mem_data", "BIO_set_mem_eof_return", "ERR_get_error", "ERR_reason_error_string", "ERR_clear_error",
    "OpenSSL_version", "OpenSSL_version_num", "SSL_get1_session", "SSL_set_session", "SSL_SESSION_free",
)


class TlsLibraryError(RuntimeError):
    """The TLS library is missing or older than the data path needs."""


class OpenSslError(Exception):
    """An OpenSSL call failed. `reason` is OpenSSL's reason in the stdlib's spelling
    ("CERTIFICATE_VERIFY_FAILED"); `verify_message` is the certificate check's own words when
    verification failed ("unable to get local issuer certificate"), else ""."""

    def __init__(self, reason: str, detail: str = "", verify_message: str = "") -> None:
        text = reason if not detail else f"{reason}: {detail}"
        super().__init__(text)
        self.reason = reason
        self.verify_message = verify_message


class ScratchBuffer:
    """SCRATCH_BYTES that one cffi call fills and Python then copies out: `memory` for the socket's
    recv_into/send, `pointer` for OpenSSL, `view` to copy a slice out as bytes."""

    __slots__ = ("memory", "pointer", "view")

    def __init__(self, ffi) -> None:
        storage = bytearray(SCRATCH_BYTES)
        self.memory = memoryview(storage)
        self.pointer = ffi.from_buffer(storage)
        self.view = ffi.buffer(self.pointer)


class Library:
    """The binding (`lib`, `ffi`), what it is, and the scratch buffers every connection of this
    thread shares: each read or write goes through them within one synchronous step (never across
    an await), so one pair per process serves all connections. Two, not one: `read_scratch` takes
    ciphertext from the socket and plaintext from the SSL, `send_scratch` ciphertext for the socket,
    so making records (an alert met while reading) never lands on plaintext not yet copied out."""

    __slots__ = ("lib", "ffi", "version_text", "version_number", "binding", "boringssl",
                 "read_scratch", "send_scratch", "pointer_holder", "length_holder")

    def __init__(self, name: str = "") -> None:
        """`name`: "boringssl" (our build, proxy.tls._boringssl) or "openssl" (cryptography's); by
        default $TRIOMESH_TLS_LIBRARY, else BoringSSL when it is built."""
        name = name or os.environ.get("TRIOMESH_TLS_LIBRARY", "") or ("boringssl" if _boringssl_built() else "openssl")
        if name == "boringssl":
            self._bind_boringssl()
        elif name == "openssl":
            self._bind_openssl()
        else:
            raise TlsLibraryError(f"TRIOMESH_TLS_LIBRARY={name!r}: the data path's TLS library is boringssl or openssl")
        self.read_scratch = ScratchBuffer(self.ffi)
        self.send_scratch = ScratchBuffer(self.ffi)
        self.pointer_holder = self.ffi.new("unsigned char **")
        self.length_holder = self.ffi.new("unsigned int *")

    def _bind_boringssl(self) -> None:
        try:
            from proxy.tls import _boringssl
        except ImportError as e:
            raise TlsLibraryError(f"BoringSSL is not built ({e}): python native/build_boringssl.py "
                                  "(make test, demo and bench run it)") from e
        lib, ffi = _boringssl.lib, _boringssl.ffi
        missing = [name for name in (*REQUIRED_FUNCTIONS, "tm_keep_new_sessions", "tm_take_new_session")
                   if not hasattr(lib, name)]
        if missing:  # a module left from an older binding
            raise TlsLibraryError(f"proxy/tls/_boringssl lacks {', '.join(missing)}: rebuild it with "
                                  "python native/build_boringssl.py")
        self.lib, self.ffi = lib, ffi
        self.boringssl = True
        self.version_number = int(lib.OpenSSL_version_num())
        self.version_text = ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode("ascii", "replace")
        self.binding = "triomesh's own (native/build_boringssl.py)"

    def _bind_openssl(self) -> None:
        import cryptography
        from cryptography.hazmat.bindings.openssl.binding import Binding

        binding = Binding()
        lib, ffi = binding.lib, binding.ffi
        self.lib, self.ffi = lib, ffi
        self.boringssl = False
        self.version_number = int(lib.OpenSSL_version_num())
        self.version_text = ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode("ascii", "replace")
        self.binding = f"cryptography {cryptography.__version__} (bundled OpenSSL)"
        missing = [name for name in REQUIRED_FUNCTIONS if not hasattr(lib, name)]
        if missing:
            raise TlsLibraryError(f"{self.binding}'s binding lacks {', '.join(missing)}, which the data path's TLS calls")
        if self.version_number < MINIMUM_VERSION_NUMBER:
            raise TlsLibraryError(
                f"the data path needs OpenSSL {MINIMUM_VERSION_TEXT} or later and cryptography "
                f"{cryptography.__version__} links {self.version_text} (a build against the system OpenSSL); "
                f"install cryptography's own wheel: pip install --only-binary cryptography cryptography")

    def describe(self) -> dict:
        """What /server_info and the startup log say about it."""
        return {"library": self.version_text, "binding": self.binding}

    def error(self, detail: str = "", ssl=None) -> OpenSslError:
        """The error at the head of OpenSSL's queue (the queue is emptied); with `ssl`, a failed
        certificate check says why."""
        lib, ffi = self.lib, self.ffi
        code = lib.ERR_get_error()
        reason = ""
        if code:
            text = lib.ERR_reason_error_string(code)
            reason = ffi.string(text).decode("ascii", "replace") if text != ffi.NULL else f"error {code:#x}"
        lib.ERR_clear_error()
        verify_message = ""
        # OpenSSL writes reasons in words ("certificate verify failed"), BoringSSL as names
        name = reason.upper().replace(" ", "_") if reason else "UNKNOWN_ERROR"
        if ssl is not None:
            result = lib.SSL_get_verify_result(ssl)
            if result != lib.X509_V_OK and name == "CERTIFICATE_VERIFY_FAILED":
                verify_message = ffi.string(lib.X509_verify_cert_error_string(result)).decode("ascii", "replace")
                verify_message = verify_message[:1].lower() + verify_message[1:]  # BoringSSL capitalizes
        return OpenSslError(name, verify_message or detail, verify_message)


_library: Library | None = None


def _boringssl_built() -> bool:
    import importlib.util

    return importlib.util.find_spec("proxy.tls._boringssl") is not None


def library() -> Library:
    """The loaded library (loaded, checked and logged on first use; TlsLibraryError when unusable)."""
    global _library
    if _library is None:
        loaded = Library()
        log.info("tls library loaded", **loaded.describe())
        _library = loaded
    return _library


def describe() -> dict:
    """For /server_info: the library the data path's TLS uses, or why it cannot be used."""
    try:
        return library().describe()
    except (TlsLibraryError, ImportError) as e:
        return {"library": "", "error": str(e)}
