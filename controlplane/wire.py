"""The control-plane wire protocol, sans-IO: message types, frame encoding, and one frame decoder.

Theory of operation (docs/controlplane-protocol.md is the spec). A stream is a sequence of frames, each
a 4-byte big-endian body length followed by one MessagePack-encoded message. Every message is a member
of one tagged union (the tag is the `type` field), so a single decoder reads any frame, and new fields
are added with defaults so older peers keep decoding (msgspec ignores unknown fields). A frame that is
too long, does not decode, or carries an unknown `type` is a `ProtocolError`: the driver sends an
`Error` message and closes the stream; nothing else is affected.

Istio resources travel as the same mapping a YAML document would hold (camelCase names, durations as
"1.5s" strings), pre-encoded to MessagePack once per resource (`msgspec.Raw`), so a push to many proxies
re-uses the bytes, and the receiver validates them with the loader's own code path.
"""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any, Union

import msgspec

from proxy.config.errors import ConfigError
from proxy.config.istio import Duration, IstioObject

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20  # a mesh config of many thousand resources still fits
_LEN = struct.Struct(">I")
HEADER_BYTES = _LEN.size


class ProtocolError(Exception):
    """The peer broke the protocol. `code` is one of the Error codes in the spec."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class _Msg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


# --------------------------------------------------------------------------------------------------
# resources on the wire


class ResourceKey(msgspec.Struct, frozen=True, array_like=True):
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class WireResource(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One Istio resource: its YAML-equivalent mapping (MessagePack) plus where it was defined, so an
    error found by the proxy names the original file and document."""

    body: msgspec.Raw
    file: str = "<controlplane>"
    document: int = -1


# --------------------------------------------------------------------------------------------------
# messages


class Hello(_Msg, tag="hello"):
    """Proxy -> control plane, first frame of a proxy stream."""

    node_id: str
    namespace: str = "default"
    labels: dict[str, str] = {}
    service_account: str = ""
    address: str = ""  # the workload's IP; with `register`, it becomes a WorkloadEntry
    ports: dict[str, int] = {}  # WorkloadEntry ports (port name -> number) for registration
    register: bool = False
    protocol_version: int = PROTOCOL_VERSION
    last_version: str = ""  # the snapshot version the proxy serves now ("" when none)
    admin_address: str = ""  # HOST:PORT of the proxy's admin listener, for `triomesh proxy-config`
    token: str = ""  # a bootstrap token: proves the proxy may take its namespace/service account's identity


class Welcome(_Msg, tag="welcome"):
    """Control plane -> proxy, answer to Hello."""

    server_id: str
    heartbeat_interval_s: float
    protocol_version: int = PROTOCOL_VERSION
    # the control plane is a CA: the proxy may send CertificateRequests for `identity` (its SPIFFE ID)
    issues_certificates: bool = False
    identity: str = ""


class CertificateRequest(_Msg, tag="certificate_request"):
    """Proxy -> control plane, only after a Welcome with `issues_certificates`: sign this CSR (PEM)
    for the identity the Welcome named. Carries no private key."""

    request_id: int
    csr: bytes


class CertificateReply(_Msg, tag="certificate_reply"):
    """Control plane -> proxy: the certificate chain (PEM, leaf first) and the trust bundle (PEM
    roots), or `error_code` and `error`."""

    request_id: int
    certificate_chain: bytes = b""
    trust_bundle: bytes = b""
    error_code: str = ""
    error: str = ""


class TrustBundle(_Msg, tag="trust_bundle"):
    """Control plane -> every proxy admitted with an identity: the trusted roots changed (rotation)."""

    trust_bundle: bytes


class Snapshot(_Msg, tag="snapshot"):
    """Control plane -> proxy. `full`: `resources` is the whole set, replacing what the proxy has.
    Delta (not full): `resources` are added or changed, `removed` are deleted; applies only on top of
    `base_version`, the version the proxy ACKed last on this stream."""

    version: str
    nonce: str
    full: bool = True
    base_version: str = ""
    resources: list[WireResource] = []
    removed: list[ResourceKey] = []


class Ack(_Msg, tag="ack"):
    version: str
    nonce: str


class Nack(_Msg, tag="nack"):
    """The proxy refused a snapshot and keeps serving `serving_version`."""

    version: str
    nonce: str
    error: str
    serving_version: str = ""


class Heartbeat(_Msg, tag="heartbeat"):
    seq: int = 0


class Error(_Msg, tag="error"):
    """Sent just before closing a stream because of a protocol violation."""

    code: str
    message: str


class Source(msgspec.Struct, array_like=True):
    name: str
    data: bytes


class ApplyRequest(_Msg, tag="apply"):
    """CLI -> control plane (first frame of a request stream): create or replace every resource in
    `sources` (YAML files), kubectl-style."""

    sources: list[Source]
    token: str = ""  # an admin token, required by a control plane serving TLS


class DeleteRequest(_Msg, tag="delete"):
    """Remove every resource named (kind, namespace, name) in `sources`."""

    sources: list[Source]
    token: str = ""


class ApplyResult(_Msg, tag="apply_result"):
    ok: bool
    config_version: str = ""
    error: str = ""
    created: list[str] = []
    configured: list[str] = []
    unchanged: list[str] = []
    deleted: list[str] = []


class StatusRequest(_Msg, tag="status"):
    token: str = ""


class ProxyStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    node_id: str
    namespace: str
    labels: dict[str, str] = {}
    address: str = ""
    admin_address: str = ""
    connected: bool = True
    sent_version: str = ""
    acked_version: str = ""
    last_nack: str = ""
    last_nack_version: str = ""
    connected_for_s: float = 0.0
    last_seen_s_ago: float = 0.0
    identity: str = ""  # the SPIFFE ID the proxy proved (a control plane with a CA)
    certificate_serial: str = ""
    certificate_not_after: str = ""


class StatusReply(_Msg, tag="status_reply"):
    config_version: str
    proxies: list[ProxyStatus] = []


Message = Union[
    Hello, Welcome, Snapshot, Ack, Nack, Heartbeat, Error,
    CertificateRequest, CertificateReply, TrustBundle,
    ApplyRequest, DeleteRequest, ApplyResult, StatusRequest, StatusReply,
]
MESSAGE_TYPES = tuple(m.__struct_config__.tag for m in Message.__args__)  # type: ignore[attr-defined]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_type_probe = msgspec.msgpack.Decoder(dict[str, Any])


def encode_frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError("FRAME_TOO_LARGE", f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(body)) + body


def _decode_body(body: bytes) -> Message:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        # tell "unknown message type" apart from any other malformed frame
        try:
            probe = _type_probe.decode(body)
        except msgspec.DecodeError:
            probe = None
        if probe is not None and "type" in probe and probe["type"] not in MESSAGE_TYPES:
            raise ProtocolError("UNKNOWN_TYPE", f"unknown message type {probe['type']!r}") from None
        raise ProtocolError("MALFORMED", f"undecodable frame: {e}") from None


class FrameDecoder:
    """Sans-IO: `feed(bytes)` returns the complete messages so far; raises ProtocolError on the first
    bad frame (after which the stream is unusable). An oversized length is refused from its header,
    before its body is buffered."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_BYTES:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > self.max_frame_bytes:
                raise ProtocolError("FRAME_TOO_LARGE", f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}")
            end = pos + HEADER_BYTES + length
            if end > n:
                break
            # a copy: decoded messages keep views (msgspec.Raw) into their frame's bytes
            out.append(_decode_body(bytes(buf[pos + HEADER_BYTES : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------------------------------
# Istio resources <-> wire mappings


def _format_duration(seconds: float) -> str:
    # the shortest repr, written without an exponent (the duration syntax has none): parses back exactly
    text = format(Decimal(repr(seconds)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}s"


def _enc_hook(obj: Any) -> Any:
    # the config's custom scalars are str/float subclasses; put them back into their YAML spelling
    if isinstance(obj, Duration):
        return _format_duration(float(obj))
    for base in (str, bool, int, float):  # other scalar subclasses: their plain value
        if isinstance(obj, base):
            return base(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_resource_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_mapping_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode_istio(obj: IstioObject) -> bytes:
    """The MessagePack encoding of a resource's YAML-equivalent mapping."""
    return _resource_encoder.encode(obj)


def decode_istio(body: bytes | msgspec.Raw, *, file: str, document: int):
    """A wire resource body -> a loaded `proxy.config.load.Resource`, through the same conversion and
    checks as a YAML document. Raises ConfigError."""
    from proxy.config.load import load_document

    try:
        doc = _mapping_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ConfigError(f"resource body is not a MessagePack mapping: {e}", file=file, document=document) from None
    return load_document(doc, file, document)
