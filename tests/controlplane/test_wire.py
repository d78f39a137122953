"""The wire protocol, sans-IO: frames, the tagged union, limits, and resources round-tripping."""

from __future__ import annotations

import struct

import msgspec
import pytest

from controlplane import wire
from proxy.config.errors import ConfigError
from proxy.config.load import load_bytes

VS = b"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {regex: "/api/v[0-9]+"}}]
    timeout: 1.5s
    route: [{destination: {host: reviews, subset: v1}, weight: 100}]
  - timeout: 10us
    route: [{destination: {host: reviews}}]
"""


def test_every_message_round_trips_through_one_decoder():
    messages = [
        wire.Hello(node_id="a", namespace="ns", labels={"app": "x"}, register=True, address="127.0.0.5"),
        wire.Welcome(server_id="cp", heartbeat_interval_s=5.0),
        wire.Snapshot(version="v1", nonce="1", resources=[wire.WireResource(body=msgspec.Raw(b"\x80"))],
                      removed=[wire.ResourceKey("VirtualService", "ns", "n")], full=False, base_version="v0"),
        wire.Ack(version="v1", nonce="1"),
        wire.Nack(version="v1", nonce="1", error="bad"),
        wire.Heartbeat(seq=3),
        wire.Error(code="MALFORMED", message="x"),
        wire.ApplyRequest(sources=[wire.Source("f.yaml", b"x")]),
        wire.DeleteRequest(sources=[wire.Source("f.yaml", b"x")]),
        wire.ApplyResult(ok=True, created=["a"]),
        wire.StatusRequest(),
        wire.StatusReply(config_version="3", proxies=[wire.ProxyStatus(node_id="a", namespace="ns")]),
    ]
    data = b"".join(wire.encode_frame(m) for m in messages)
    dec = wire.FrameDecoder()
    # one byte at a time: frames split anywhere still decode
    out = []
    for i in range(len(data)):
        out.extend(dec.feed(data[i : i + 1]))
    assert [type(m) for m in out] == [type(m) for m in messages]
    assert out[0] == messages[0]
    assert out[2].removed == messages[2].removed
    assert bytes(out[2].resources[0].body) == b"\x80"
    assert dec.pending_bytes == 0


def test_oversized_frame_is_refused_from_its_header():
    dec = wire.FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(wire.ProtocolError) as e:
        dec.feed(struct.pack(">I", 1025))
    assert e.value.code == "FRAME_TOO_LARGE"
    assert "1025 bytes exceeds the limit of 1024" in str(e.value)


def test_unknown_type_and_malformed_frames():
    body = msgspec.msgpack.encode({"type": "subscribe", "x": 1})
    with pytest.raises(wire.ProtocolError) as e:
        wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert e.value.code == "UNKNOWN_TYPE" and "'subscribe'" in e.value.message
    for body in (b"\xc1garbage", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"type": "ack", "version": 1})):
        with pytest.raises(wire.ProtocolError) as e:
            wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
        assert e.value.code == "MALFORMED"
    # a missing required field names it
    body = msgspec.msgpack.encode({"type": "hello"})
    with pytest.raises(wire.ProtocolError, match="node_id"):
        wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_new_fields_from_a_newer_peer_are_ignored():
    body = msgspec.msgpack.encode({"type": "ack", "version": "v", "nonce": "n", "future_field": [1]})
    (msg,) = wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert msg == wire.Ack(version="v", nonce="n")


def test_resources_round_trip_with_the_loader_checks():
    (r,) = load_bytes(VS, "vs.yaml")
    body = wire.encode_istio(r.obj)
    doc = msgspec.msgpack.decode(body)
    assert doc["spec"]["http"][0]["timeout"] == "1.5s"  # YAML spelling, not a float
    assert doc["spec"]["http"][1]["timeout"] == "0.000009999999999999999s"
    back = wire.decode_istio(body, file="vs.yaml", document=0)
    assert back.obj == r.obj and back.file == "vs.yaml"
    # a body the proxy's loader refuses gives the loader's precise error
    doc["spec"]["http"][0]["route"][0]["weight"] = 101
    with pytest.raises(ConfigError) as e:
        wire.decode_istio(msgspec.msgpack.encode(doc), file="vs.yaml", document=0)
    assert str(e.value).startswith("vs.yaml: document 0 (VirtualService prod/reviews): $.spec.http[0].route[0].weight:")
    with pytest.raises(ConfigError, match="not a MessagePack mapping"):
        wire.decode_istio(b"\x01", file="x", document=0)


def test_every_example_resource_round_trips(tmp_path):
    from pathlib import Path

    from proxy.config.load import load_path

    files = sorted(Path(__file__).resolve().parents[2].glob("examples/**/*.yaml"))
    assert files, "no example config found"
    count = 0
    for f in files:
        for r in load_path(f):
            back = wire.decode_istio(wire.encode_istio(r.obj), file=r.file, document=r.document)
            assert back.obj == r.obj, (f, r.key)
            count += 1
    assert count >= 10


def test_http2_settings_round_trip():
    (dr, gw) = load_bytes(b"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: grpc, namespace: prod}
spec:
  host: grpc
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 100}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  servers: [{port: {number: 8080, name: grpc, protocol: grpc}, hosts: ["*"]}]
""", "h2.yaml")
    for r in (dr, gw):
        back = wire.decode_istio(wire.encode_istio(r.obj), file=r.file, document=r.document)
        assert back.obj == r.obj
    http = msgspec.msgpack.decode(wire.encode_istio(dr.obj))["spec"]["trafficPolicy"]["connectionPool"]["http"]
    assert http == {"h2UpgradePolicy": "UPGRADE", "maxConcurrentStreams": 100}
    assert msgspec.msgpack.decode(wire.encode_istio(gw.obj))["spec"]["servers"][0]["port"]["protocol"] == "GRPC"


def test_security_kinds_round_trip():
    # portLevelMtls is keyed by port numbers (integers): they survive MessagePack as integers
    from proxy.config.load import load_bytes

    text = """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: p, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: foo}
spec:
  action: AUDIT
  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}], when: [{key: "request.headers[x]", notValues: [y]}]}]
"""
    for r in load_bytes(text, "security.yaml"):
        back = wire.decode_istio(wire.encode_istio(r.obj), file=r.file, document=r.document)
        assert back.obj == r.obj, r.key


def test_identity_fields_keep_older_peers_decoding():
    """The certificate fields were added with defaults: a version-1 peer that predates them decodes the
    new Hello/Welcome (unknown fields are ignored), and their frames decode here with the defaults."""

    class OldMsg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
        pass

    class OldHello(OldMsg, tag="hello"):
        node_id: str
        namespace: str = "default"

    class OldWelcome(OldMsg, tag="welcome"):
        server_id: str
        heartbeat_interval_s: float

    new_hello = wire.encode_frame(wire.Hello(node_id="p", namespace="tutorial", token="secret"))
    assert msgspec.msgpack.decode(new_hello[4:], type=OldHello) == OldHello(node_id="p", namespace="tutorial")
    new_welcome = wire.encode_frame(wire.Welcome(server_id="cp", heartbeat_interval_s=1.0, issues_certificates=True,
                                                 identity="spiffe://cluster.local/ns/tutorial/sa/default"))
    assert msgspec.msgpack.decode(new_welcome[4:], type=OldWelcome) == OldWelcome(server_id="cp", heartbeat_interval_s=1.0)
    old_welcome = msgspec.msgpack.encode(OldWelcome(server_id="cp", heartbeat_interval_s=1.0))
    (decoded,) = wire.FrameDecoder().feed(len(old_welcome).to_bytes(4, "big") + old_welcome)
    assert decoded == wire.Welcome(server_id="cp", heartbeat_interval_s=1.0)
    assert not decoded.issues_certificates  # so a new proxy sends no certificate_request to an old control plane
    old_status = msgspec.msgpack.encode({"type": "status"})
    assert wire.FrameDecoder().feed(len(old_status).to_bytes(4, "big") + old_status) == [wire.StatusRequest()]


def test_telemetry_round_trips():
    from proxy.config.load import load_bytes

    text = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 2.5, disableSpanReporting: true}]
"""
    [r] = load_bytes(text, "telemetry.yaml")
    back = wire.decode_istio(wire.encode_istio(r.obj), file=r.file, document=r.document)
    assert back.obj == r.obj
