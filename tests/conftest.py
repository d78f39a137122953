"""Every test's control planes keep their state in the test's own directory, never the user's."""

import pytest


@pytest.fixture(autouse=True)
def _controlplane_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIOMESH_DATA_DIR", str(tmp_path / "triomesh-data"))
