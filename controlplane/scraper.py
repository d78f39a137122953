"""Scrapes each connected proxy's `/stats/prometheus` (at the admin address it reported in its Hello)
on a timer and records the Istio metrics into the mesh view's window (controlplane/meshgraph.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import h11
import trio

from controlplane.meshgraph import TelemetryWindow, summarize

MAX_EXPOSITION_BYTES = 8 << 20
# above the proxy's own wait for its workers' stats (2 s): a slow worker costs its rows, not the scrape
SCRAPE_TIMEOUT_S = 5.0


class ScrapeError(Exception):
    pass


def scrape_address(admin_address: str, registered_address: str) -> tuple[str, int] | None:
    """HOST:PORT to scrape; an admin bound to every address (0.0.0.0, ::) is reached at the workload's
    registered address. None when there is nothing usable."""
    host, _, port = admin_address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    if host in ("0.0.0.0", "::"):
        if not registered_address:
            return None
        host = registered_address
    return host, int(port)


async def fetch_exposition(host: str, port: int, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """GET /stats/prometheus over plain HTTP/1.1 (the admin listener's protocol)."""
    connection = h11.Connection(h11.CLIENT)
    body = bytearray()
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(connection.send(h11.Request(
                    method="GET", target="/stats/prometheus",
                    headers=[("host", f"{host}:{port}"), ("connection", "close")])))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        if event.status_code != 200:
                            raise ScrapeError(f"{host}:{port}/stats/prometheus answered {event.status_code}")
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_EXPOSITION_BYTES:
                            raise ScrapeError(f"{host}:{port}/stats/prometheus is over {MAX_EXPOSITION_BYTES} bytes")
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
    except trio.TooSlowError as e:
        raise ScrapeError(f"{host}:{port}/stats/prometheus: no answer within {timeout_s}s") from e
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as e:
        raise ScrapeError(f"{host}:{port}/stats/prometheus: {e}") from e
    return body.decode("utf-8", errors="replace")


class Scraper:
    """`targets()` yields (node id, admin address, registered address) of the connected proxies."""

    def __init__(self, targets: Callable[[], Iterable[tuple[str, str, str]]], log: Any,
                 window: TelemetryWindow | None = None, interval_s: float = 2.0) -> None:
        self.targets = targets
        self.log = log
        self.window = window if window is not None else TelemetryWindow()
        self.interval_s = interval_s
        self.last_error: dict[str, str] = {}  # node id -> why its last scrape failed

    async def run(self) -> None:
        while True:
            await self.scrape_once()
            await trio.sleep(self.interval_s)

    async def scrape_once(self) -> None:
        targets = list(self.targets())
        for gone in set(self.window.scrapes) - {node for node, _, _ in targets}:
            self.window.forget(gone)
            self.last_error.pop(gone, None)
        async with trio.open_nursery() as nursery:
            for node, admin_address, registered_address in targets:
                nursery.start_soon(self._scrape, node, admin_address, registered_address)

    async def _scrape(self, node: str, admin_address: str, registered_address: str) -> None:
        address = scrape_address(admin_address, registered_address)
        if address is None:
            self.last_error[node] = f"no admin address to scrape ({admin_address!r})"
            return
        try:
            text = await fetch_exposition(*address)
            summary = summarize(text)
        except ScrapeError as e:
            if self.last_error.get(node) != str(e):
                self.log.warning("scrape_failed", node_id=node, error=str(e))
            self.last_error[node] = str(e)
            return
        except Exception as e:  # one proxy's odd answer must not stop the view (nor the control plane)
            self.log.exception("scrape_failed", node_id=node)
            self.last_error[node] = f"{type(e).__name__}: {e}"
            return
        self.last_error.pop(node, None)
        self.window.record(node, trio.current_time(), summary)
