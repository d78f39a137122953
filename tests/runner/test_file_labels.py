"""`--label` means the same to a proxy reading `--config` files as to one fed by a control plane: its
workload labels decide `sourceLabels` matches (and Gateway selectors). A real proxy process, real
backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runner.harness import Backend, Proxy, free_port, get, mesh_config

# a route only for callers labelled app=edge, before the catch-all that sends everything to v1
EDGE_ONLY = ("  - match: [{sourceLabels: {app: edge}, uri: {prefix: /who}}]\n"
             "    route: [{destination: {host: backend, subset: v2}}]\n")


@pytest.fixture
def config(tmp_path: Path):
    v1, v2 = Backend("v1"), Backend("v2")
    port = free_port()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mesh.yaml").write_text(
        mesh_config(port, v1.port, v2.port, weights=(100, 0), extra_routes=EDGE_ONLY))
    yield tmp_path, port
    v1.close()
    v2.close()


@pytest.mark.parametrize(("labels", "expected"), [
    (["--label", "app=edge", "--label", "version=v1"], "v2 /who"),  # sourceLabels match: the edge-only route
    (["--label", "app=other"], "v1 /who"),  # labels that do not match: the catch-all
    ([], "v1 /who"),  # no labels: a standalone proxy matches no sourceLabels
])
def test_source_labels_route_fires_from_files_with_label(config, labels: list[str], expected: str) -> None:
    tmp_path, port = config
    proxy = Proxy(tmp_path / "config", tmp_path, concurrency=1, extra_args=labels).start()
    try:
        assert get(port, "/who") == (200, expected)
    finally:
        proxy.stop()
