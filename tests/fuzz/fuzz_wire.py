"""Fuzz target: the control-plane stream decoder (controlplane/wire.py FrameDecoder) and what the proxy
and the control plane do with the decoded messages (resource bodies through the loader).

Properties: a byte stream yields messages or a ProtocolError, the same however it is cut into reads;
every message decoded re-encodes to a frame that decodes to an equal message; the resources of a
Snapshot (proxy side) and the sources of an ApplyRequest (control-plane side) load or raise
ConfigError, nothing else; the decoder never buffers more than one frame."""

from __future__ import annotations

from controlplane.store import load_sources
from controlplane.wire import HEADER_BYTES, ApplyRequest, FrameDecoder, ProtocolError, Snapshot, encode_frame
from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.xds.client import build_resource_set

MAX_LEN = 8192
MAX_FRAME_BYTES = 4096  # small, so the fuzzer reaches the limit


def _decode(pieces: list[bytes]) -> tuple[list, ProtocolError | None]:
    decoder = FrameDecoder(MAX_FRAME_BYTES)
    messages: list = []
    try:
        for piece in pieces:
            messages += decoder.feed(piece)
            assert decoder.pending_bytes < HEADER_BYTES + MAX_FRAME_BYTES, decoder.pending_bytes
    except ProtocolError as e:
        return messages, e
    return messages, None


def check(data: bytes) -> None:
    whole, error = _decode([data])
    cut = data[0] * len(data) // 256 if data else 0
    split, split_error = _decode([data[:cut], data[cut:]])
    assert split == whole, "messages depend on how the stream was cut into reads"
    assert (split_error is None) == (error is None), f"{error!r} vs {split_error!r}"
    if error is not None:
        assert error.code in ("FRAME_TOO_LARGE", "MALFORMED", "UNKNOWN_TYPE"), error.code
    for message in whole:
        again, again_error = _decode([encode_frame(message)])
        assert again_error is None and again == [message], f"{message!r} does not survive a round trip"
        try:
            if isinstance(message, Snapshot):
                resources = build_resource_set(message, {}, "")
                compile_resources(resources.values(), version=message.version)
            elif isinstance(message, ApplyRequest):
                compile_resources(load_sources((s.name, s.data) for s in message.sources), version="fuzz")
        except ConfigError:
            pass
