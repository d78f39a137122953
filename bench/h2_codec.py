"""What the pure-Python `h2` package costs per HTTP/2 request/response pair, in memory (no sockets).

    python -m bench.h2_codec                  # wall time per request (about 30 s)
    python -m bench.h2_codec --instructions   # also callgrind instructions (3 min; each process < 30 s)
    python -m bench.h2_codec --profile        # cProfile of server_get_c1/_c16: top functions in h2, hpack, hyperframe
    python -m bench.h2_codec --cases server_get_c1,hpack_server

Every case is one prior-knowledge connection carrying many streams, either one at a time (`_c1`) or 16 in
flight (`_c16`: 16 requests arrive in one read, 16 responses leave in one write). The peer's bytes are
recorded once up front by a real h2 peer in a loopback (so they contain its SETTINGS ACK, its periodic
WINDOW_UPDATEs and an HPACK dynamic table that evolves as on a real connection) and are replayed into a
fresh connection for the measured side, which does exactly what the proxy does and no more:

  server_*   the proxy's downstream side: receive_data(request bytes); on StreamEnded send_headers (:status,
             content-type, content-length, server, date, x-request-id), send_data (end_stream, or followed
             by trailers); acknowledge_received_data for request DATA; one data_to_send() per read.
  client_*   the proxy's upstream side: send_headers (+ send_data) with end_stream, data_to_send(), then
             receive_data(response bytes) and acknowledge_received_data for response DATA.
  *_get      a small GET (4 pseudo-headers, user-agent, accept and 5 ordinary headers, END_STREAM on
             HEADERS); response HEADERS + 100 B DATA with END_STREAM (`_trailers`: + trailers grpc-status: 0).
  *_grpc     a unary gRPC call: request HEADERS + DATA (5-byte prefix + 20 B) END_STREAM; response HEADERS,
             DATA (5 + 20 B), trailers HEADERS (grpc-status, grpc-message) END_STREAM.
  hpack_*    the HPACK part of a GET exchange alone (server: decode request + encode response; client: the
             reverse), with hpack's Encoder/Decoder as h2 calls them.
  frames_*   the hyperframe part of a GET exchange alone (server: parse the HEADERS frame, serialize HEADERS
             + DATA; client: the reverse), with the calls h2 makes.

x-request-id differs on every request (1,024 distinct values in turn), as a real mesh's does; every other
field repeats, so HPACK's dynamic table serves it after the first request (`--fixed-request-id`: the same
x-request-id everywhere, HPACK's best case). Both sides validate inbound
headers (validate_inbound_headers=True, normalize_inbound_headers=False, header_encoding=None) and skip
outbound validation and normalisation (the proxy builds those fields itself); `--outbound-checks` turns
them back on; that is proxy/l7/h2_codec.py's h2_config. SETTINGS stay h2's defaults (64 KiB windows, 100
streams), not the proxy's larger ones: that changes only how often a WINDOW_UPDATE passes. The proxy's own
field checks on top of h2's are not included. The garbage collector stays enabled, as in the proxy.

Wall time: each case runs R rounds of N requests on a fresh connection each, timed with
time.perf_counter_ns around the request loop only; the best round is reported. Instructions: like
bench/instructions.py, each case runs under valgrind's callgrind twice, for N1 and N2 requests, from the
same recording (so loading it cancels out), and (total2 - total1) / (N2 - N1) is one request's
user-space instructions, start-up and shutdown cancelled out (PYTHONHASHSEED=0 for repeatability).

Results on the development machine (2 shared, busy cores, so wall time is noisy there: +-30% between runs;
instruction counts repeat within 0.1%), Python 3.11.7, h2 4.4.1, hpack 4.2.0, hyperframe 6.1.0,
`--instructions --rounds 7 --requests 4096`:

    case                   µs/req (c1 / c16)   instructions/req (c1 / c16)
    server_get               124 / 115           1,170k / 1,171k
    client_get               118 / 108           1,082k / 1,080k
    client_get_trailers      150 / 126           1,240k / 1,238k
    server_grpc              129 / 112           1,084k / 1,084k
    client_grpc              125 / 111           1,089k / 1,087k
    hpack_server / _client    49 / 50              582k / 594k
    frames_server / _client    9 / 9                97k / 96k

One side of one exchange in h2 costs about 1.1-1.2 M instructions: five times a whole proxied HTTP/1.1
request (about 220k, of which 90k is a bare Trio forwarder; bench/instructions.py), and an HTTP/2 proxy
needs two sides. 16 streams in flight save nothing: the cost is per stream, not per read or write. hpack
is about half of it (its table search is linear, its Huffman coder works a nibble at a time, and it logs
through `logging` on every field), hyperframe under a tenth; the rest is h2's stream state machine, its
header validation (h2.utilities, about a fifth of the own time under cProfile) and its event objects.
With --fixed-request-id, so that every field is indexed, server_get is still 917k and hpack_server
328k. Outbound checks on add about 60k to server_get.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pickle
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from proxy.l7.h2_hpack import Decoder as OurDecoder
from proxy.l7.h2_hpack import Encoder as OurEncoder

Headers = list[tuple[bytes, bytes]]

DISTINCT_IDS = 1024
AUTHORITY = b"reviews.default.svc.cluster.local:9080"
DATE = b"Tue, 12 May 2026 10:00:00 GMT"


def _request_id(i: int) -> bytes:
    """A uuid4-shaped value, different for each i and the same in every run."""
    return b"%08x-%04x-4%03x-a%03x-%012x" % ((i * 2654435761) & 0xFFFFFFFF, i & 0xFFFF, i & 0xFFF, (i * 7) & 0xFFF,
                                             (i * 40503 * 65537) & 0xFFFFFFFFFFFF)


def _get_request(i: int) -> Headers:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/reviews/0?page=2&sort=recent"),
        (b":authority", AUTHORITY),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
        (b"accept", b"application/json, text/plain, */*"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"accept-language", b"en-US,en;q=0.5"),
        (b"x-forwarded-proto", b"https"),
        (b"x-envoy-attempt-count", b"1"),
        (b"x-request-id", _request_id(i)),
    ]


def _get_response(i: int) -> Headers:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/json"),
        (b"content-length", b"100"),
        (b"server", b"triomesh"),
        (b"date", DATE),
        (b"x-request-id", _request_id(i)),
    ]


def _grpc_request(i: int) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/reviews.v1.Reviews/GetReview"),
        (b":authority", AUTHORITY),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"grpc-go/1.62.1"),
        (b"grpc-accept-encoding", b"gzip"),
        (b"grpc-timeout", b"4999m"),
        (b"x-request-id", _request_id(i)),
    ]


def _grpc_response(i: int) -> Headers:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-accept-encoding", b"gzip"),
    ]


GRPC_MESSAGE = b"\x00\x00\x00\x00\x14" + b"\x0a\x12review-0123456789ab"  # 5-byte prefix + 20-byte protobuf


@dataclass(frozen=True)
class Exchange:
    """One request/response shape; headers are indexed by (stream_id >> 1) % DISTINCT_IDS."""

    requests: list[Headers]
    request_body: bytes | None
    responses: list[Headers]
    response_body: bytes
    trailers: Headers | None


def _exchange(request: Callable[[int], Headers], request_body: bytes | None, response: Callable[[int], Headers],
              response_body: bytes, trailers: Headers | None) -> Exchange:
    return Exchange([request(i) for i in range(DISTINCT_IDS)], request_body,
                    [response(i) for i in range(DISTINCT_IDS)], response_body, trailers)


EXCHANGES = {
    "get": _exchange(_get_request, None, _get_response, b"x" * 100, None),
    "get_trailers": _exchange(_get_request, None, _get_response, b"x" * 100, [(b"grpc-status", b"0")]),
    "grpc": _exchange(_grpc_request, GRPC_MESSAGE, _grpc_response, GRPC_MESSAGE,
                      [(b"grpc-status", b"0"), (b"grpc-message", b"")]),
}


def _fix_request_ids() -> None:
    """Every request and response of every exchange carries the first one's fields."""
    for ex in EXCHANGES.values():
        ex.requests[:] = [ex.requests[0]] * DISTINCT_IDS
        ex.responses[:] = [ex.responses[0]] * DISTINCT_IDS


def _config(client_side: bool, outbound_checks: bool) -> H2Configuration:
    return H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True,
                           normalize_inbound_headers=False, validate_outbound_headers=outbound_checks,
                           normalize_outbound_headers=outbound_checks, split_outbound_cookies=False)


# --- what the proxy does on each side -------------------------------------------------------------------------

def serve(conn: H2Connection, chunk: bytes, ex: Exchange) -> bytes:
    """Downstream side: one read of request bytes in, every completed request answered, one write out."""
    for event in conn.receive_data(chunk):
        kind = type(event)
        if kind is DataReceived:
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif kind is StreamEnded:
            stream_id = event.stream_id
            conn.send_headers(stream_id, ex.responses[(stream_id >> 1) % DISTINCT_IDS])
            if ex.trailers is None:
                conn.send_data(stream_id, ex.response_body, end_stream=True)
            else:
                conn.send_data(stream_id, ex.response_body)
                conn.send_headers(stream_id, ex.trailers, end_stream=True)
    return conn.data_to_send()


def send_requests(conn: H2Connection, ex: Exchange, count: int) -> bytes:
    """Upstream side: open `count` streams, each request complete, one write out."""
    for _ in range(count):
        stream_id = conn.get_next_available_stream_id()
        headers = ex.requests[(stream_id >> 1) % DISTINCT_IDS]
        if ex.request_body is None:
            conn.send_headers(stream_id, headers, end_stream=True)
        else:
            conn.send_headers(stream_id, headers)
            conn.send_data(stream_id, ex.request_body, end_stream=True)
    return conn.data_to_send()


def receive_responses(conn: H2Connection, chunk: bytes) -> bytes:
    """Upstream side: one read of response bytes in, DATA handed back to flow control, one write out."""
    for event in conn.receive_data(chunk):
        if type(event) is DataReceived:
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return conn.data_to_send()


# --- recordings of the peer ---------------------------------------------------------------------------------------

@dataclass
class Recording:
    to_server_setup: bytes  # client preface, SETTINGS and SETTINGS ACK
    to_client_setup: bytes  # server SETTINGS and SETTINGS ACK
    to_server: list[bytes]  # per batch: the client's WINDOW_UPDATEs from the batch before, then its requests
    to_client: list[bytes]  # per batch: the server's responses


def record(ex: Exchange, requests: int, concurrency: int, outbound_checks: bool) -> Recording:
    """Both sides of one connection, driven by the functions above, with every byte kept."""
    client = H2Connection(_config(True, outbound_checks))
    server = H2Connection(_config(False, outbound_checks))
    client.initiate_connection()
    server.initiate_connection()
    preface = client.data_to_send()
    server.receive_data(preface)
    to_client_setup = server.data_to_send()
    client.receive_data(to_client_setup)
    settings_ack = client.data_to_send()
    server.receive_data(settings_ack)
    assert not server.data_to_send()
    rec = Recording(preface + settings_ack, to_client_setup, [], [])
    pending = b""
    for _ in range(requests // concurrency):
        rec.to_server.append(pending + send_requests(client, ex, concurrency))
        rec.to_client.append(serve(server, rec.to_server[-1], ex))
        pending = receive_responses(client, rec.to_client[-1])
    assert client.open_outbound_streams == 0 and server.open_inbound_streams == 0
    return rec


# --- the cases ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    what: str
    prepare: Callable[[int, bool], object]  # (requests, outbound_checks) -> picklable data for run
    run: Callable[[object, int, bool], int]  # (data, requests, outbound_checks) -> ns spent in the request loop


def _h2_case(side: str, exchange: str, concurrency: int) -> Case:
    ex = EXCHANGES[exchange]

    def prepare(requests: int, outbound_checks: bool) -> Recording:
        return record(ex, requests, concurrency, outbound_checks)

    def run_server(rec: Recording, requests: int, outbound_checks: bool) -> int:
        conn = H2Connection(_config(False, outbound_checks))
        conn.initiate_connection()
        conn.receive_data(rec.to_server_setup)
        conn.data_to_send()
        chunks = rec.to_server
        start = time.perf_counter_ns()
        for i in range(requests // concurrency):
            serve(conn, chunks[i], ex)
        elapsed = time.perf_counter_ns() - start
        assert conn.highest_inbound_stream_id == 2 * requests - 1 and conn.open_inbound_streams == 0
        return elapsed

    def run_client(rec: Recording, requests: int, outbound_checks: bool) -> int:
        conn = H2Connection(_config(True, outbound_checks))
        conn.initiate_connection()
        conn.data_to_send()
        conn.receive_data(rec.to_client_setup)
        conn.data_to_send()
        chunks = rec.to_client
        start = time.perf_counter_ns()
        for i in range(requests // concurrency):
            send_requests(conn, ex, concurrency)
            receive_responses(conn, chunks[i])
        elapsed = time.perf_counter_ns() - start
        assert conn.highest_outbound_stream_id == 2 * requests - 1 and conn.open_outbound_streams == 0
        return elapsed

    shape = {"get": "GET, 100 B response", "get_trailers": "GET, 100 B response + trailers",
             "grpc": "unary gRPC, 25 B each way + trailers"}[exchange]
    who = "h2 server (downstream)" if side == "server" else "h2 client (upstream)"
    return Case(f"{side}_{exchange}_c{concurrency}", f"{who}: {shape}, {concurrency} in flight", prepare,
                run_server if side == "server" else run_client)


@dataclass
class Blocks:
    """HPACK blocks and frame bytes of the GET exchange, as h2 put them on the wire, one per request."""

    request_blocks: list[bytes]
    response_blocks: list[bytes]
    request_frames: list[bytes]  # the HEADERS frame of each request
    response_frames: list[bytes]  # HEADERS + DATA of each response


def _blocks(requests: int, _outbound_checks: bool) -> Blocks:
    ex = EXCHANGES["get"]
    request_encoder, response_encoder = Encoder(), Encoder()
    blocks = Blocks([], [], [], [])
    for i in range(requests):
        stream_id = 2 * i + 1
        request = request_encoder.encode(ex.requests[i % DISTINCT_IDS])
        response = response_encoder.encode(ex.responses[i % DISTINCT_IDS])
        blocks.request_blocks.append(request)
        blocks.response_blocks.append(response)
        blocks.request_frames.append(HeadersFrame(stream_id, data=request, flags=("END_HEADERS", "END_STREAM"))
                                     .serialize())
        blocks.response_frames.append(HeadersFrame(stream_id, data=response, flags=("END_HEADERS",)).serialize()
                                      + DataFrame(stream_id, data=ex.response_body, flags=("END_STREAM",)).serialize())
    return blocks


def _parse_frames(data: bytes) -> list[Frame]:
    """What h2's FrameBuffer does with one read: frame headers, then bodies."""
    view = memoryview(data)
    frames, offset = [], 0
    while offset < len(data):
        frame, length = Frame.parse_frame_header(view[offset:offset + 9])
        frame.parse_body(view[offset + 9:offset + 9 + length])
        frames.append(frame)
        offset += 9 + length
    return frames


def _run_hpack_server(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    decoder, encoder = Decoder(), Encoder()
    responses, request_blocks = EXCHANGES["get"].responses, blocks.request_blocks
    start = time.perf_counter_ns()
    for i in range(requests):
        decoder.decode(request_blocks[i], raw=True)
        encoder.encode(responses[i % DISTINCT_IDS])
    return time.perf_counter_ns() - start


def _run_hpack_client(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    decoder, encoder = Decoder(), Encoder()
    requests_headers, response_blocks = EXCHANGES["get"].requests, blocks.response_blocks
    start = time.perf_counter_ns()
    for i in range(requests):
        encoder.encode(requests_headers[i % DISTINCT_IDS])
        decoder.decode(response_blocks[i], raw=True)
    return time.perf_counter_ns() - start


def _run_ours_hpack_server(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    """hpack_server with proxy/l7/h2_hpack.py: decode the same request blocks (hpack's, Huffman-coded as
    h2 sends them; with the RFC 9113 field checks our decoder always does), encode the same responses."""
    decoder, encoder = OurDecoder(), OurEncoder()
    responses, request_blocks = EXCHANGES["get"].responses, blocks.request_blocks
    start = time.perf_counter_ns()
    for i in range(requests):
        decoder.decode(request_blocks[i])
        encoder.encode(responses[i % DISTINCT_IDS])
    return time.perf_counter_ns() - start


def _run_ours_hpack_client(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    """hpack_client with proxy/l7/h2_hpack.py (decoding hpack's response blocks)."""
    decoder, encoder = OurDecoder(), OurEncoder()
    requests_headers, response_blocks = EXCHANGES["get"].requests, blocks.response_blocks
    start = time.perf_counter_ns()
    for i in range(requests):
        encoder.encode(requests_headers[i % DISTINCT_IDS])
        decoder.decode(response_blocks[i])
    return time.perf_counter_ns() - start


def _run_frames_server(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    body = EXCHANGES["get"].response_body
    request_frames, response_blocks = blocks.request_frames, blocks.response_blocks
    start = time.perf_counter_ns()
    for i in range(requests):
        _parse_frames(request_frames[i])
        headers = HeadersFrame(2 * i + 1)
        headers.data = response_blocks[i]
        headers.flags.add("END_HEADERS")
        data = DataFrame(2 * i + 1)
        data.data = body
        data.flags.add("END_STREAM")
        b"".join([headers.serialize(), data.serialize()])
    return time.perf_counter_ns() - start


def _run_frames_client(blocks: Blocks, requests: int, _outbound_checks: bool) -> int:
    request_blocks, response_frames = blocks.request_blocks, blocks.response_frames
    start = time.perf_counter_ns()
    for i in range(requests):
        headers = HeadersFrame(2 * i + 1)
        headers.data = request_blocks[i]
        headers.flags.add("END_HEADERS")
        headers.flags.add("END_STREAM")
        headers.serialize()
        _parse_frames(response_frames[i])
    return time.perf_counter_ns() - start


CASES = {case.name: case for case in [
    _h2_case("server", "get", 1),
    _h2_case("server", "get", 16),
    _h2_case("client", "get", 1),
    _h2_case("client", "get", 16),
    _h2_case("client", "get_trailers", 1),
    _h2_case("client", "get_trailers", 16),
    _h2_case("server", "grpc", 1),
    _h2_case("server", "grpc", 16),
    _h2_case("client", "grpc", 1),
    _h2_case("client", "grpc", 16),
    Case("hpack_server", "hpack alone, GET: decode request + encode response", _blocks, _run_hpack_server),
    Case("hpack_client", "hpack alone, GET: encode request + decode response", _blocks, _run_hpack_client),
    Case("ours_hpack_server", "proxy.l7.h2_hpack, GET: decode request + encode response", _blocks,
         _run_ours_hpack_server),
    Case("ours_hpack_client", "proxy.l7.h2_hpack, GET: encode request + decode response", _blocks,
         _run_ours_hpack_client),
    Case("frames_server", "hyperframe alone, GET: parse HEADERS, serialize HEADERS + DATA", _blocks,
         _run_frames_server),
    Case("frames_client", "hyperframe alone, GET: serialize HEADERS, parse HEADERS + DATA", _blocks,
         _run_frames_client),
]}


# --- measuring ----------------------------------------------------------------------------------------------------

def wall_us(case: Case, requests: int, rounds: int, outbound_checks: bool) -> float:
    """Best round's µs per request; each round on a fresh connection over the same recording."""
    data = case.prepare(requests, outbound_checks)
    case.run(data, min(requests, 256), outbound_checks)  # warm-up
    return min(case.run(data, requests, outbound_checks) for _ in range(rounds)) / requests / 1000


def _callgrind_total(name: str, requests: int, recording: Path, flags: list[str], workdir: Path) -> int:
    out = workdir / f"callgrind.{name}.{requests}"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "bench.h2_codec",
           "--child", name, str(requests), str(recording)] + flags
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, PYTHONHASHSEED="0"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{name} under callgrind failed: {proc.stderr[-2000:]}")
    return int(found.group(1))


def instructions(names: list[str], first: int, extra: int, outbound_checks: bool, fixed_ids: bool) -> dict[str, float]:
    """(total(N2) - total(N1)) / (N2 - N1) per case, two callgrind processes at a time (counts ignore load)."""
    flags = ["--outbound-checks"] * outbound_checks + ["--fixed-request-id"] * fixed_ids
    with tempfile.TemporaryDirectory(prefix="triomesh-h2-codec-") as tmp:
        workdir = Path(tmp)
        jobs = []
        for name in names:
            recording = workdir / f"{name}.pickle"
            recording.write_bytes(pickle.dumps(CASES[name].prepare(first + extra, outbound_checks)))
            jobs += [(name, first, recording), (name, first + extra, recording)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            totals = list(pool.map(lambda job: _callgrind_total(*job, flags, workdir), jobs))
    return {name: (totals[2 * i + 1] - totals[2 * i]) / extra for i, name in enumerate(names)}


def profile(name: str, requests: int, outbound_checks: bool, top: int) -> str:
    """cProfile of one case: the top functions of h2, hpack and hyperframe by own time, and each module's share."""
    case = CASES[name]
    data = case.prepare(requests, outbound_checks)
    profiler = cProfile.Profile()
    profiler.enable()
    case.run(data, requests, outbound_checks)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows, by_module, total = [], defaultdict(float), 0.0
    for (filename, line, function), (_, calls, own, _cumulative, _) in stats.stats.items():
        total += own
        found = re.search(r"site-packages/(h2|hpack|hyperframe)/(\w+)\.py$", filename)
        module = (f"{found.group(1)}.{found.group(2)}" if found else "C functions" if filename == "~" else
                  "/".join(Path(filename).parts[-2:]) if filename.endswith("__init__.py") else Path(filename).name)
        by_module[module] += own
        if found:
            rows.append((own, calls, f"{module}:{line}({function})"))
    lines = [f"cProfile of {name} ({requests} requests; cProfile inflates small calls, read shares not µs):",
             f"  {'own %':>6} {'calls/req':>9}  function"]
    for own, calls, where in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {100 * own / total:6.1f} {calls / requests:9.2f}  {where}")
    lines.append("  own time by module: " + ", ".join(
        f"{module} {100 * own / total:.0f}%" for module, own in sorted(by_module.items(), key=lambda kv: -kv[1])[:10]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.h2_codec", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--requests", type=int, default=2048, help="requests per wall-time round (multiple of 16)")
    ap.add_argument("--rounds", type=int, default=5, help="wall-time rounds per case; the best is reported")
    ap.add_argument("--instructions", action="store_true", help="also count instructions under callgrind")
    ap.add_argument("--callgrind-requests", type=int, nargs=2, default=[128, 512], metavar=("N1", "EXTRA"),
                    help="requests of the first callgrind run, and how many more the second one makes")
    ap.add_argument("--profile", nargs="?", const="server_get_c1,server_get_c16", metavar="CASES",
                    help="print a cProfile of these cases (default: server_get_c1,server_get_c16) instead of the table")
    ap.add_argument("--outbound-checks", action="store_true", help="h2's outbound header validation/normalising on")
    ap.add_argument("--fixed-request-id", action="store_true", help="the same x-request-id on every request")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "REQUESTS", "RECORDING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fixed_request_id:
        _fix_request_ids()
    if args.child:
        name, requests, recording = args.child
        CASES[name].run(pickle.loads(Path(recording).read_bytes()), int(requests), args.outbound_checks)
        return
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or args.requests % 16 or sum(args.callgrind_requests) % 16 or args.callgrind_requests[0] % 16:
        sys.exit(f"unknown cases {unknown}" if unknown else "request counts must be multiples of 16")
    if args.profile:
        for name in args.profile.split(","):
            print(profile(name.strip(), args.requests, args.outbound_checks, top=25), end="\n\n")
        return
    counts = {}
    if args.instructions:
        if shutil.which("valgrind") is None:
            sys.exit("--instructions needs valgrind (apt-get install valgrind)")
        counts = instructions(names, *args.callgrind_requests, args.outbound_checks, args.fixed_request_id)
    print(f"h2 {version('h2')}, hpack {version('hpack')}, hyperframe {version('hyperframe')}, Python "
          f"{sys.version.split()[0]}; outbound checks {'on' if args.outbound_checks else 'off'}; x-request-id "
          f"{'fixed' if args.fixed_request_id else 'varying'}; wall: best of {args.rounds} x {args.requests} requests")
    print(f"{'case':<24} {'µs/req':>7} {'instr/req':>10}  what")
    for name in names:
        us = wall_us(CASES[name], args.requests, args.rounds, args.outbound_checks)
        instr = f"{counts[name]:,.0f}" if name in counts else "-"
        print(f"{name:<24} {us:7.1f} {instr:>10}  {CASES[name].what}", flush=True)


if __name__ == "__main__":
    main()
