"""Fuzz target: the protocol sniffer (proxy/l4/sniff.py), first bytes of a connection -> TLS/h2/HTTP/1/opaque.

Properties: `detect` never raises; at EOF it always decides; a decision, once made on a prefix, is
the one the whole input gets (the driver stops reading at the first decision, so a later byte must
not be able to change it); an SNI is lowercase ASCII."""

from __future__ import annotations

from proxy.l4.sniff import NEED_MORE, Detection, Protocol, detect

MAX_LEN = 2048


def _checked(data: bytes, at_eof: bool):
    result = detect(data, at_eof=at_eof)
    assert result is NEED_MORE or isinstance(result, Detection), repr(result)
    if at_eof:
        assert result is not NEED_MORE, "at EOF the sniffer must decide"
    if isinstance(result, Detection) and result.protocol is Protocol.TLS and result.sni is not None:
        assert result.sni.isascii() and result.sni == result.sni.lower(), result.sni
    return result


def check(data: bytes) -> None:
    whole = _checked(data, at_eof=False)
    _checked(data, at_eof=True)
    # the first byte picks a split point: what the sniffer says on that prefix must hold for the whole
    cut = data[0] * len(data) // 256 if data else 0
    prefix = _checked(data[:cut], at_eof=False)
    if prefix is not NEED_MORE:
        assert whole == prefix, f"decided {prefix} on {cut} bytes, then {whole} on {len(data)}"
