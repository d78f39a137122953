"""User-space instructions per kept-alive request through `TlsConn` (or plaintext `Conn`), counted by
callgrind with the client in the same Trio run, so the count does not move with the machine's load:

    python -m bench.tls_instructions [--design memorybio|plaintext] [--source DIR]

bench.tls_bench's server answers small requests from a client `SSLObject` (plain socket for
`plaintext`) over a socketpair; two runs of 200 and 1,200 requests, and the difference of their totals
divided by 1,000 is the cost of one request (client and server: the client's share is the same for
every version of `proxy/tls`, so differences between versions are the server's). Trio's scheduling
order is seeded, so repeated counts agree within about 0.5%. The server runs with a worker's
collector policy (thresholds, start-up objects frozen). `--source DIR` measures another checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

FIRST, SECOND = 200, 1200


async def _client(sock: socket.socket, ca_file: str, tls: bool, requests: int) -> None:
    from trio.lowlevel import wait_readable

    from bench.tls_bench import REQUEST, RESPONSE
    sock.setblocking(False)
    if tls:
        context = ssl.create_default_context(cafile=ca_file)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_object = context.wrap_bio(incoming, outgoing, server_hostname="bench.local")
        while True:
            try:
                tls_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            sock.send(outgoing.read())
            await wait_readable(sock)
            incoming.write(sock.recv(65536))
        if outgoing.pending:
            sock.send(outgoing.read())
    for _ in range(requests):
        if tls:
            tls_object.write(REQUEST)
            sock.send(outgoing.read())
        else:
            sock.send(REQUEST)
        got = 0
        while got < len(RESPONSE):
            if tls:
                try:
                    got += len(tls_object.read(65536))
                    continue
                except ssl.SSLWantReadError:
                    pass
            await wait_readable(sock)
            data = sock.recv(65536)
            if tls:
                incoming.write(data)
            else:
                got += len(data)
    sock.close()


def serve(design: str, requests: int) -> None:
    """One run (the process callgrind counts)."""
    import trio

    from bench import tls_bench
    trio._core._run._r.seed(0)  # the same scheduling order every run
    # a worker's collector policy (proxy/runner/worker.py): its thresholds, and what was imported
    # frozen out of the passes. Without it, full passes walk every module's objects, so a count moves
    # with how much code the checkout imports rather than with what a request does
    try:
        from proxy.runner.garbage_collection import freeze_startup_objects, pace_collector
    except ImportError:  # a checkout older than them runs with CPython's defaults
        pass
    else:
        pace_collector()
        freeze_startup_objects()

    async def main() -> None:
        with tls_bench.identity_files() as (cert, key, ca_file):
            context = tls_bench.server_context(str(cert), str(key), alpn=("http/1.1",))
            client_sock, server_sock = socket.socketpair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_client, client_sock, str(ca_file), design != "plaintext", requests)
                await tls_bench.SERVERS[design](server_sock, context)

    trio.run(main)


def count_instructions(arguments: list[str], source: Path, out: Path) -> int:
    """The user-space instructions callgrind counts in `python arguments...` run with the checkout
    `source` on the path (its profile written to `out`); RuntimeError with valgrind's words when the
    run fails."""
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *arguments],
                          cwd=source, env=dict(os.environ, PYTHONPATH=str(source)),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{source}: the run under callgrind failed: {done.stderr[-2000:]}")
    return int(found.group(1))


def _count(design: str, requests: int, source: Path, workdir: Path) -> int:
    return count_instructions([str(Path(__file__).resolve()), "--serve", str(requests), "--design", design],
                              source, workdir / f"callgrind.{requests}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", choices=("memorybio", "plaintext"), default="memorybio")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose proxy/ is measured (default: this one)")
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)  # one counted run
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.design, args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp:
        first = _count(args.design, FIRST, args.source.resolve(), Path(tmp))
        second = _count(args.design, SECOND, args.source.resolve(), Path(tmp))
    print(f"{args.design} ({args.source}): {(second - first) // (SECOND - FIRST):,} instructions per request "
          f"(client + server, callgrind, user space; {FIRST} and {SECOND} requests)")


if __name__ == "__main__":
    main()
