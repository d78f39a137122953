"""The one TLS library of the data path: the OpenSSL that `cryptography`'s wheels link statically,
reached through cryptography's own cffi binding, with its version check and its error queue as text.

Why not the stdlib's `ssl`: Python here is linked to the system OpenSSL 3.0, whose mutual TLS
handshake costs a third more CPU than 3.2 and later (client certificate decoding); docs/tls.md has
the figures. The binding is imported on first use, so a proxy that serves no TLS never loads it.
"""

from __future__ import annotations

import structlog

log = structlog.get_logger("triomesh.tls")

MINIMUM_VERSION_NUMBER = 0x30200000
MINIMUM_VERSION_TEXT = "3.2"
# the largest ciphertext or plaintext moved by one cffi call: a whole 64 KiB read or write and its
# record overhead fit, so the common case is one call
SCRATCH_BYTES = 128 * 1024


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


class Library:
    """The binding (`lib`, `ffi`), what it is, and the scratch buffers every connection of this
    thread shares: each read or write goes through them within one synchronous step (never across
    an await), so one pair per process serves all connections."""

    __slots__ = ("lib", "ffi", "version_text", "version_number", "cryptography_version",
                 "scratch", "scratch_c", "scratch_view", "pointer_holder", "length_holder")

    def __init__(self) -> None:
        import cryptography
        from cryptography.hazmat.bindings.openssl.binding import Binding

        binding = Binding()
        lib, ffi = binding.lib, binding.ffi
        self.lib, self.ffi = lib, ffi
        self.version_number = int(lib.OpenSSL_version_num())
        self.version_text = ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode("ascii", "replace")
        self.cryptography_version = cryptography.__version__
        if self.version_number < MINIMUM_VERSION_NUMBER:
            raise TlsLibraryError(
                f"the data path needs OpenSSL {MINIMUM_VERSION_TEXT} or later and cryptography "
                f"{self.cryptography_version} links {self.version_text} (a build against the system OpenSSL); "
                f"install cryptography's own wheel: pip install --only-binary cryptography cryptography")
        self.scratch = bytearray(SCRATCH_BYTES)
        self.scratch_c = ffi.from_buffer(self.scratch)
        self.scratch_view = ffi.buffer(self.scratch_c)
        self.pointer_holder = ffi.new("unsigned char **")
        self.length_holder = ffi.new("unsigned int *")

    def describe(self) -> dict:
        """What /server_info and the startup log say about it."""
        return {"library": self.version_text, "binding": f"cryptography {self.cryptography_version} (bundled OpenSSL)"}

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
        if ssl is not None:
            result = lib.SSL_get_verify_result(ssl)
            if result != lib.X509_V_OK and "certificate verify failed" in reason.lower():
                verify_message = ffi.string(lib.X509_verify_cert_error_string(result)).decode("ascii", "replace")
        name = reason.upper().replace(" ", "_") if reason else "UNKNOWN_ERROR"
        return OpenSslError(name, verify_message or detail, verify_message)


_library: Library | None = None


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
