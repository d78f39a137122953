"""Fixtures for capture tests: a fresh lab namespace per test (root only)."""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from proxy.l4.capture.lab import Lab, open_lab

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root")


def needs_tool(command: str, package: str) -> pytest.MarkDecorator:
    """Skip (saying why) when a tool is missing on a developer's machine; in CI (CI set) never skip:
    the test runs and fails, because CI installs its tools and a silent skip would hide that."""
    missing = shutil.which(command) is None and not os.environ.get("CI")
    return pytest.mark.skipif(missing, reason=f"{command} is not installed (Debian package {package}; `make system-deps`)")


@pytest.fixture
def pod_lab() -> Iterator[Lab]:
    """A lab with one node "pod": a fresh network namespace with an empty nat table."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with open_lab(["pod"]) as lab:
        yield lab
