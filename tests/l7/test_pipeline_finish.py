"""pipeline.finish, the end of every request: the downstream count, Istio's metrics through the
plane's bound record_known (or nothing with the metrics off), and a metrics bug that costs the
request nothing."""

from __future__ import annotations

from proxy.l7.context import RequestContext
from proxy.l7.dataplane import DataPlane
from proxy.l7.events import RequestHead
from proxy.l7.pipeline import finish
from proxy.runtime import SnapshotHolder
from proxy.stats import Stats, merge
from tests.config.helpers import compile_docs, doc

SNAPSHOT = compile_docs(
    doc("ServiceEntry", "preference", {"hosts": ["preference"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                                       "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}],
                                       "endpoints": [{"address": "10.0.0.2"}]}, namespace="tutorial"))


def _ended(status: int = 200, flags: tuple[str, ...] = ()) -> RequestContext:
    ctx = RequestContext(SNAPSHOT, None, "127.0.0.1:40000", RequestHead(b"GET", b"/", b"preference:8080", []), 0.0, 0.0)
    ctx.status = status
    ctx.response_flags.extend(flags)
    return ctx


def _counts(stats: Stats, prefix: str) -> dict:
    """Counts by (name, response_code), summed over the other labels."""
    counts: dict = {}
    for (kind, name, labels), value in merge([stats.export()]).items():
        if name.startswith(prefix):
            key = (name, dict(labels).get("response_code"))
            counts[key] = counts.get(key, 0) + value
    return counts


async def test_with_the_metrics_on_every_ended_request_is_counted_once() -> None:
    """In a Trio run, as the proxy is: the metrics read the run's clock."""
    stats = Stats()
    plane = DataPlane(SnapshotHolder(SNAPSHOT), stats)
    assert plane.record_known == plane.telemetry.record_known
    for status in (200, 200, 503):
        finish(plane, _ended(status))
    finish(plane, _ended(503, ("UF",)))  # response flags: the general path
    assert _counts(stats, "istio_requests_total") == {("istio_requests_total", "200"): 2,
                                                      ("istio_requests_total", "503"): 2}
    assert _counts(stats, "triomesh_downstream_rq_total")[("triomesh_downstream_rq_total", "503")] == 2


def test_with_the_metrics_off_nothing_of_them_runs() -> None:
    stats = Stats()
    plane = DataPlane(SnapshotHolder(SNAPSHOT), stats, telemetry=False)
    assert plane.telemetry is None and plane.record_known is None
    finish(plane, _ended(200))
    assert _counts(stats, "istio_") == {}
    assert _counts(stats, "triomesh_downstream_rq_total") == {("triomesh_downstream_rq_total", "200"): 1}


def test_a_metrics_failure_is_logged_and_the_request_still_counted() -> None:
    stats = Stats()
    plane = DataPlane(SnapshotHolder(SNAPSHOT), stats)

    def broken(ctx) -> None:
        raise RuntimeError("a bug in the metrics")

    plane.telemetry.record_request = broken  # the general path, which a request with flags takes
    finish(plane, _ended(502, ("UF",)))  # does not raise
    assert _counts(stats, "triomesh_downstream_rq_total") == {("triomesh_downstream_rq_total", "502"): 1}
    assert _counts(stats, "istio_requests_total") == {}
