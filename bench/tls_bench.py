"""CPU per keep-alive request through the two TLS designs the data path could use, on loopback:

    python -m bench.tls_bench [--requests N] [--rounds R] [--upload MIB]

- `memorybio`: proxy/tls/conn.py's TlsConn (an OpenSSL SSL over two memory BIOs on the plain
  non-blocking socket, syscall first, wait only on EAGAIN: the data path's own IO rules);
- `sslstream`: trio.SSLStream over trio.SocketStream (Trio's own TLS stream, on the stdlib's `ssl`);
- `plaintext`: proxy/l7/connio.py's Conn without TLS, the floor.

Each server answers a small HTTP/1.1 request with a small response (what a proxy does twice per
request). The client runs in another process (its CPU is not counted) and sends N requests one
after another on one keep-alive connection; the figure is the server process's CPU time
(user+system, time.process_time) divided by N. Rounds alternate the designs; the lowest of each is
kept, the least disturbed by other load on a shared machine. Bounded: a few seconds in all.

`--upload MIB`: instead, a client process uploads MIB MiB over one TLS connection (1 MiB writes, so
full 16 KiB records) and the server (TlsConn) writes each fill's plaintext onward to /dev/null, as a
TCP route sends it upstream; the figures are server CPU seconds per GiB and the plaintext one fill
hands on, medians of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio
import trustme

from proxy.l7.connio import Conn
from proxy.tls.conn import TlsConn
from proxy.tls.context import server_context

REQUEST = b"GET /bench HTTP/1.1\r\nhost: bench.local\r\nuser-agent: tls-bench\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

_CLIENT = r'''
import socket, ssl, sys
port, count, tls, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
request = %r
expected = %d
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if tls:
    context = ssl.create_default_context(cafile=ca)
    sock = context.wrap_socket(sock, server_hostname="bench.local")
for _ in range(count):
    sock.sendall(request)
    got = 0
    while got < expected:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("server closed")
        got += len(data)
sock.close()
''' % (REQUEST, len(RESPONSE))


_UPLOAD_CLIENT = r'''
import os, socket, ssl, sys
port, mib, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sock = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                                         server_hostname="bench.local")
chunk = os.urandom(1 << 20)
for _ in range(mib):
    sock.sendall(chunk)
sock.shutdown(socket.SHUT_WR)
try:
    while sock.recv(65536):  # the server's session tickets, then its end
        pass
except OSError:
    pass
sock.close()
'''


async def _one_upload(context, ca_file: str, mib: int) -> tuple[float, float]:
    """Server CPU seconds per GiB and bytes per fill for one upload of `mib` MiB through TlsConn."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = subprocess.Popen([sys.executable, "-c", _UPLOAD_CLIENT, str(listener.getsockname()[1]), str(mib),
                               ca_file])
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
        conn = TlsConn(sock, context, server_side=True)
        with trio.fail_after(120):
            await conn.handshake(10.0)
            started = time.process_time()
            total = fills = 0
            while n := await conn.fill():
                os.write(sink, conn.take_buffered())
                total += n
                fills += 1
            used = time.process_time() - started
        conn.close()
    finally:
        os.close(sink)
        listener.close()
        try:
            client.wait(timeout=10)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    if client.returncode != 0 or total != mib << 20:
        raise RuntimeError(f"upload: the client failed (exit {client.returncode}) or {total} bytes arrived")
    return used / mib * 1024, total / fills


async def _serve_conn(conn: Conn) -> None:
    try:
        while True:
            end = conn.buf.find(b"\r\n\r\n", conn.pos)
            if end < 0:
                if await conn.fill() == 0:
                    return
                continue
            conn.pos = end + 4
            rest = conn.send_nowait(RESPONSE)
            if rest is not None:
                await conn.send_all(rest)
    except OSError:
        pass
    finally:
        conn.close()


async def _serve_memorybio(sock: socket.socket, context) -> None:
    conn = TlsConn(sock, context, server_side=True)
    await conn.handshake(10.0)
    await _serve_conn(conn)


async def _serve_plaintext(sock: socket.socket, context) -> None:
    await _serve_conn(Conn(sock))


async def _serve_sslstream(sock: socket.socket, context: ssl.SSLContext) -> None:
    stream = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), context, server_side=True)
    buffer = b""
    try:
        await stream.do_handshake()
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                continue
            buffer = buffer[end + 4:]
            await stream.send_all(RESPONSE)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


SERVERS = {"plaintext": _serve_plaintext, "memorybio": _serve_memorybio, "sslstream": _serve_sslstream}


async def _one_run(design: str, context, ca_file: str, requests: int) -> float:
    """Server CPU seconds per request for one client run against `design`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, str(port), str(requests),
                               "0" if design == "plaintext" else "1", ca_file])
    try:
        await trio.lowlevel.wait_readable(listener)
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.process_time()
        with trio.fail_after(60):
            await SERVERS[design](sock, context)
        used = time.process_time() - started
    finally:
        listener.close()
        try:
            client.wait(timeout=10)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
    if client.returncode != 0:
        raise RuntimeError(f"{design}: the client failed (exit {client.returncode})")
    return used / requests


@contextlib.contextmanager
def identity_files() -> Iterator[tuple[Path, Path, Path]]:
    """A throwaway CA and a server certificate for bench.local, as PEM files: (chain, key, CA)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("bench.local")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem"), Path(tmp, "ca.pem")
        leaf.private_key_and_cert_chain_pem.write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        ca.cert_pem.write_to_path(ca_file)
        yield cert, key, ca_file


async def measure(requests: int, rounds: int) -> dict[str, float]:
    with identity_files() as (cert, key, ca_file):
        context = server_context(str(cert), str(key), alpn=("http/1.1",))
        stdlib = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # trio.SSLStream takes only the stdlib's contexts
        stdlib.load_cert_chain(str(cert), str(key))
        stdlib.set_alpn_protocols(["http/1.1"])
        best: dict[str, float] = {}
        for _ in range(rounds):
            for design in SERVERS:
                per_request = await _one_run(design, stdlib if design == "sslstream" else context, str(ca_file),
                                             requests)
                best[design] = min(best.get(design, per_request), per_request)
    return best


async def measure_upload(mib: int, rounds: int) -> tuple[float, float]:
    with identity_files() as (cert, key, ca_file):
        context = server_context(str(cert), str(key), alpn=("http/1.1",))
        runs = [await _one_upload(context, str(ca_file), mib) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per design, the lowest kept (default 3)")
    parser.add_argument("--upload", type=int, metavar="MIB", help="measure a TLS upload of MIB MiB instead")
    args = parser.parse_args(argv)
    if args.upload:
        per_gib, per_fill = trio.run(measure_upload, args.upload, args.rounds)
        print(f"TLS upload through TlsConn ({args.upload} MiB, median of {args.rounds}): server CPU "
              f"{per_gib:.3f} s per GiB, {per_fill / 1024:.1f} KiB per fill")
        return 0
    best = trio.run(measure, args.requests, args.rounds)
    print(f"server CPU per keep-alive request ({args.requests} requests, best of {args.rounds}; sslstream: "
          f"{ssl.OPENSSL_VERSION}):")
    for design, seconds in best.items():
        print(f"  {design:10s} {seconds * 1e6:7.1f} µs")
    print(f"  sslstream / memorybio: {best['sslstream'] / best['memorybio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
