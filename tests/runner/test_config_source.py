"""Config discovery and change detection: which files count, and when the fingerprint moves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config.errors import ConfigError
from proxy.runner.config_source import config_files, content_digest, fingerprint, read_sources


def test_directory_lists_yaml_files_sorted(tmp_path: Path) -> None:
    for name in ["b.yml", "a.yaml", "notes.txt", "c.yaml.bak"]:
        (tmp_path / name).write_text("x: 1\n")
    (tmp_path / "sub.yaml").mkdir()
    assert [p.name for p in config_files(tmp_path)] == ["a.yaml", "b.yml"]


def test_single_file_and_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("x: 1\n")
    assert config_files(f) == [f]  # a file named explicitly is read whatever its suffix
    with pytest.raises(ConfigError, match="no such file"):
        config_files(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no such file"):
        read_sources(tmp_path / "nope")
    assert fingerprint(tmp_path / "nope") == ()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fingerprint(empty) == ()


def test_fingerprint_moves_on_write_add_and_remove(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("x: 1\n")
    fp0 = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == fp0
    a.write_text("x: 22\n")  # size changes
    fp1 = fingerprint(tmp_path)
    assert fp1 != fp0
    st = a.stat()
    a.write_text("x: 23\n")  # same size: the mtime must tell
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fp2 = fingerprint(tmp_path)
    assert fp2 != fp1
    (tmp_path / "b.yaml").write_text("y: 1\n")
    fp3 = fingerprint(tmp_path)
    assert fp3 != fp2
    (tmp_path / "b.yaml").unlink()
    assert fingerprint(tmp_path) == fp2


def test_digest_follows_names_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"x: 1\n")
    sources = read_sources(tmp_path)
    assert sources == [(str(tmp_path / "a.yaml"), b"x: 1\n")]
    assert content_digest(sources) == content_digest(list(sources))
    assert content_digest(sources) != content_digest([(sources[0][0], b"x: 2\n")])
    assert content_digest(sources) != content_digest([("other.yaml", b"x: 1\n")])
    # the boundary between name and bytes is unambiguous
    assert content_digest([("a", b"bc")]) != content_digest([("ab", b"c")])
