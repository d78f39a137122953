"""Resources received from the control plane as config `sources` (name, bytes): the form in which the
runner's supervisor keeps its active config (its content digest, the name /config_dump shows) whether
it came from files or from a control plane."""

from __future__ import annotations

import msgspec

from controlplane.wire import encode_istio
from proxy.config.load import Resource

_json = msgspec.json.Encoder()


def to_sources(resources: list[Resource], version: str) -> list[tuple[str, bytes]]:
    """One YAML stream (JSON documents, which YAML reads as flow mappings) named after the version.
    Loading it with proxy.config.load.load_bytes gives back resources equal to `resources`."""
    docs = [_json.encode(msgspec.msgpack.decode(encode_istio(r.obj))) for r in resources]
    return [(f"<controlplane version {version}>", b"---\n" + b"\n---\n".join(docs) + b"\n" if docs else b"")]
