"""The rotation steps on real CA directories (controlplane/ca_rotation.py): an operator's plug-in CA
is never rewritten by them, and a step stopped at any of its writes leaves a directory that loads as
the CA before the step or the one after it, and completes when run again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.ca import CA_FILES, CaError, CertificateAuthority
from controlplane.ca_rotation import add_new_root, drop_old_roots, switch_signer
from test_ca import write_plugin_ca

TD = "cluster.local"


@pytest.mark.parametrize("step", [add_new_root, switch_signer, drop_old_roots], ids=lambda f: f.__name__)
def test_the_steps_refuse_a_plugin_ca_and_leave_its_files_alone(tmp_path, step):
    write_plugin_ca(tmp_path / "ca")
    before = {name: (tmp_path / "ca" / name).read_bytes() for name in CA_FILES}
    with pytest.raises(CaError) as refused:
        step(tmp_path / "ca", TD)
    assert "a plug-in CA is used as given and never rewritten (ca-cert.pem is " in str(refused.value)
    assert "rotate it by replacing its files" in str(refused.value)
    assert {name: (tmp_path / "ca" / name).read_bytes() for name in CA_FILES} == before
    assert sorted(os.listdir(tmp_path / "ca")) == sorted(CA_FILES)


class Stop(OSError):
    pass


def stop_at_commit(monkeypatch, n: int) -> list[str]:
    """Every rename (the steps' only way to change what a reader sees) counts; the n-th fails."""
    seen: list[str] = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def failing(src, dst, *args, _real=real, **kwargs):
            seen.append(str(dst))
            if len(seen) == n:
                raise Stop(f"stopped at write {n}: {dst}")
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, failing)
    return seen


def state(directory: Path) -> tuple[bytes, list[bytes]]:
    ca = CertificateAuthority.load(directory, TD)  # raises if the directory is not a whole CA
    return ca.signing_certificate.tbs_certificate_bytes, [r.tbs_certificate_bytes for r in ca.roots]


def prepared(directory: Path, steps_done: int) -> Path:
    CertificateAuthority.load_or_create(directory, TD)
    for step in (add_new_root, switch_signer)[:steps_done]:
        step(directory, TD)
    return directory


@pytest.mark.parametrize("steps_done, step", [(0, add_new_root), (1, switch_signer), (2, drop_old_roots)],
                         ids=["add_new_root", "switch_signer", "drop_old_roots"])
def test_a_step_stopped_at_any_write_leaves_the_old_or_the_new_ca_and_completes_when_run_again(tmp_path, monkeypatch,
                                                                                            steps_done, step):
    stops = 0
    for n in range(1, 100):
        directory = prepared(tmp_path / f"at-{n}", steps_done)
        before = state(directory)
        with monkeypatch.context() as patch:
            stop_at_commit(patch, n)
            try:
                step(directory, TD)
            except Stop:
                stops += 1
            else:
                break  # this step makes fewer than n writes: every one of them was tried
        assert state(directory) == before or _is_after(step, before, *state(directory)), n
        step(directory, TD)  # run again: it completes
        assert _is_after(step, before, *state(directory))
    assert stops >= 1


def _is_after(step, before, signer, roots) -> bool:
    old_signer, old_roots = before
    if step is add_new_root:
        return signer == old_signer and roots[:-1] == old_roots and len(roots) == len(old_roots) + 1
    if step is switch_signer:
        return signer == old_roots[-1] and roots == old_roots
    return signer == old_signer and roots == [old_signer]
