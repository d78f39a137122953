"""Writes the seed corpus (corpus/<target>/): `python -m tests.fuzz.seeds`. Small valid inputs of each
kind, so the fuzzer starts inside the interesting code rather than at the first rejected byte."""

from __future__ import annotations

import ssl
from pathlib import Path

import hpack

from controlplane.wire import Ack, ApplyRequest, CertificateReply, CertificateRequest, Heartbeat, Hello, ResourceKey, \
    Snapshot, Source, TrustBundle, Welcome, WireResource, encode_frame, encode_istio
from proxy.config.load import load_bytes
from proxy.l7 import h2_frames as f
from proxy.l7.h2_codec import MAX_HEADER_LIST_BYTES, client_settings
from proxy.l7.h2_connection import H2Connection

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

GATEWAY = b"""apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: default}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /api}, headers: {x-v: {exact: "2"}}}]
    route: [{destination: {host: api.default.svc.cluster.local, subset: v2}, weight: 100}]
    retries: {attempts: 2, perTryTimeout: 1s}
    timeout: 3s
  - route: [{destination: {host: web, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3}}
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v2}}]
"""


def _client_hello(server_name: str, alpn: list[str]) -> bytes:
    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn)
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _h2_client_bytes() -> bytes:
    """What a client sends: preface, SETTINGS, a POST with a body, a PING, a WINDOW_UPDATE."""
    conn = H2Connection(client=True, settings=client_settings(), max_header_list_size=MAX_HEADER_LIST_BYTES)
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/x"),
                          (b"content-length", b"5"), (b"x-id", b"1")])
    conn.send_data(1, b"hello", end_stream=True)
    out = conn.data_to_send()
    return out + f.ping_frame(b"12345678", False) + f.window_update_frame(0, 1000) + f.SETTINGS_ACK_FRAME


def _h2_server_bytes() -> bytes:
    """What a server sends to a client whose stream 1 is open: SETTINGS, a response with DATA, trailers."""
    enc = hpack.Encoder()
    head = enc.encode([(":status", "200"), ("content-type", "text/plain")])
    trailers = enc.encode([("grpc-status", "0")])
    return (f.settings_frame({f.MAX_CONCURRENT_STREAMS: 100}) + f.SETTINGS_ACK_FRAME
            + f.frame_header(len(head), f.HEADERS, f.END_HEADERS, 1) + head
            + f.frame_header(3, f.DATA, 0, 1) + b"abc"
            + f.frame_header(len(trailers), f.HEADERS, f.END_HEADERS | f.END_STREAM, 1) + trailers
            + f.goaway_frame(1, 0, b"bye"))


def _hpack_blocks() -> bytes:
    enc = hpack.Encoder()
    out = b""
    for fields in ([(":method", "GET"), (":path", "/"), ("user-agent", "fuzz"), ("cookie", "a=b")],
                   [(":method", "GET"), (":path", "/"), ("user-agent", "fuzz"), ("x-long-value", "v" * 40)]):
        block = enc.encode(fields)
        out += bytes([len(block)]) + block
    enc.huffman = False if hasattr(enc, "huffman") else None
    block = b"\x3f\xe1\x1f" + enc.encode([(":status", "404")])  # a table size update first
    return out + bytes([len(block)]) + block


def _hpack_encoder_program() -> bytes:
    """fuzz_hpack_encoder: a request block twice (an authorization never indexed), the table emptied and
    restored in between, then a block with a 20 KB cookie."""
    block = bytes([0x14, 1, 3]) + b"GET" + bytes([2, 4]) + b"/a?b" + bytes([8, 3]) + b"abc" + bytes([0x80 | 10, 3]) + b"k=1"
    return b"\x01" + block + b"\x00\x0a" + block + bytes([0x12, 11, 0xFF]) + b"c" + bytes([13, 1]) + b"v"


# every AuthorizationPolicy and PeerAuthentication field, for the loader's security validation
SECURITY = b"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {principals: [a/ns/b/sa/c], notNamespaces: [x], ipBlocks: [10.0.0.0/8], notRemoteIpBlocks: ["::1"]}}]
    to: [{operation: {hosts: ["*.a"], notPorts: ["80"], methods: [GET], notPaths: ["/x*"]}}]
    when: [{key: "request.headers[x]", values: [y]}, {key: destination.port, notValues: ["81"]}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: p, namespace: default}
spec:
  selector: {matchLabels: {app: fuzz}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: DISABLE}}
"""


def seeds() -> dict[str, dict[str, bytes]]:
    examples = sorted((REPO / "examples").rglob("*.yaml"))
    config = {p.name: p.read_bytes() for p in examples if p.stat().st_size <= 4096}
    config["gateway-routes.yaml"] = GATEWAY
    config["security.yaml"] = SECURITY
    config["list.yaml"] = b"apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: Sidecar\n  metadata: {name: default, namespace: default}\n  spec: {egress: [{hosts: ['./*']}]}\n"
    resources = load_bytes(GATEWAY, "gw.yaml")
    wire_resources = [WireResource(body=encode_istio(r.obj), file="gw.yaml", document=r.document) for r in resources]
    h2_client = _h2_client_bytes()
    return {
        "config": config,
        "sniff": {
            "tls-sni-alpn": _client_hello("api.example.com", ["h2", "http/1.1"]),
            "h2-preface": f.PREFACE + f.settings_frame({}),
            "http1-get": b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
            "http1-options": b"OPTIONS * HTTP/1.0\r\n",
            "opaque-redis": b"*1\r\n$4\r\nPING\r\n",
        },
        "wire": {
            "hello-welcome": encode_frame(Hello(node_id="n1", labels={"app": "a"}, register=True, ports={"http": 80}))
            + encode_frame(Heartbeat(seq=3)),
            "snapshot-full": encode_frame(Snapshot(version="v1", nonce="1", resources=wire_resources)),
            "snapshot-delta": encode_frame(Snapshot(version="v2", nonce="2", full=False, base_version="",
                                                    resources=wire_resources[:1],
                                                    removed=[ResourceKey("Gateway", "default", "gw")]))
            + encode_frame(Ack(version="v2", nonce="2")),
            "apply": encode_frame(ApplyRequest(sources=[Source("gw.yaml", GATEWAY)])),
            "certificates": encode_frame(Hello(node_id="n1", namespace="ns", service_account="sa", token="t"))
            + encode_frame(Welcome(server_id="cp", heartbeat_interval_s=1.0, issues_certificates=True,
                                   identity="spiffe://cluster.local/ns/ns/sa/sa"))
            + encode_frame(CertificateRequest(request_id=1, csr=b"-----BEGIN CERTIFICATE REQUEST-----\n"))
            + encode_frame(CertificateReply(request_id=1, error_code="BAD_CSR", error="not a CSR"))
            + encode_frame(TrustBundle(trust_bundle=b"-----BEGIN CERTIFICATE-----\n")),
        },
        "chunked": {
            "two-chunks": b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            "trailers": b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n",
            "hex-sizes": b"A\r\n0123456789\r\nff\r\n" + b"x" * 255 + b"\r\n0\r\n\r\n",
        },
        # fuzz_h2: byte 0 bit 0 is the role (1 client) and the cut; a server's input omits the preface
        "h2": {
            "server-post": b"\x80" + h2_client[len(f.PREFACE):],
            "client-response": b"\x81" + _h2_server_bytes(),
        },
        "hpack": {"blocks": _hpack_blocks()},
        "hpack_encoder": {"program": _hpack_encoder_program()},
    }


def main() -> None:
    for target, inputs in seeds().items():
        directory = HERE / "corpus" / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in inputs.items():
            (directory / name).write_bytes(data)
            print(f"{directory.relative_to(REPO)}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
