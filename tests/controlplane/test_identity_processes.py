"""The CA, tokens and TLS with real processes: `triomesh controlplane --ca-dir`, `controlplane token`,
`apply`/`proxy-status` over TLS, `openssl s_client` against the control plane, and a real `triomesh
proxy` whose workers receive each renewed certificate; a control-plane restart reuses its CA.
Every process is started here and stopped by PID."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import os
import sys
import time

from tests.runner.harness import REPO_ROOT, ControlPlane, Proxy, triomesh

SERVICE = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: tutorial}
spec: {hosts: [ratings], resolution: STATIC, ports: [{number: 9080, name: http, protocol: HTTP}]}
"""


@pytest.fixture
def procs():
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


def token(ca_dir: Path, *args: str) -> str:
    r = triomesh("controlplane", "token", "--ca-dir", str(ca_dir), *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def start_controlplane(procs: list, tmp_path: Path, ca_dir: Path, *extra: str, port: int = 0) -> ControlPlane:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    cp = ControlPlane(config, tmp_path, port=port, extra_args=["--ca-dir", str(ca_dir), *extra])
    procs.append(cp)
    return cp.start()


def start_proxy(procs: list, tmp_path: Path, cp: ControlPlane, token_file: Path, namespace: str, *,
                wait_ready: bool = True) -> Proxy:
    proxy = Proxy(None, tmp_path, concurrency=1, access_log="off",
                  extra_args=["--controlplane", cp.address, "--controlplane-ca", str(cp_root(cp)),
                              "--controlplane-token-file", str(token_file), "--node-id", f"{namespace}-1",
                              "--namespace", namespace, "--service-account", "reviews"])
    procs.append(proxy)
    return proxy.start(wait_ready=wait_ready)


def cp_root(cp: ControlPlane) -> Path:
    return Path(cp.extra_args[1]) / "root-cert.pem"


def test_tls_control_plane_with_tokens_certificates_and_a_restart(tmp_path, procs):
    ca_dir = tmp_path / "ca"
    cp = start_controlplane(procs, tmp_path, ca_dir, "--workload-cert-ttl", "4s")
    root_pem = (ca_dir / "root-cert.pem").read_bytes()
    admin = tmp_path / "admin.token"
    admin.write_text(token(ca_dir, "--admin"))
    tutorial = tmp_path / "tutorial.token"
    tutorial.write_text(token(ca_dir, "--namespace", "tutorial"))

    # openssl verifies the control plane's certificate with the root, for the address it listens on
    s_client = subprocess.run(["openssl", "s_client", "-connect", cp.address, "-CAfile", str(ca_dir / "root-cert.pem"),
                               "-verify_return_error", "-verify_ip", "127.0.0.1", "-brief"],
                              input=b"", capture_output=True, timeout=30)
    assert s_client.returncode == 0, s_client.stderr
    assert b"Verification: OK" in s_client.stderr

    # CLIs: plaintext is refused, TLS without a token is refused, TLS with the admin token works
    (tmp_path / "ratings.yaml").write_text(SERVICE)
    plain = cp.cli("apply", "-f", str(tmp_path / "ratings.yaml"))
    assert plain.returncode == 1 and b"TLS_REQUIRED" in plain.stderr
    tls_args = ("--controlplane-ca", str(ca_dir / "root-cert.pem"))
    anonymous = cp.cli("apply", "-f", str(tmp_path / "ratings.yaml"), *tls_args)
    assert anonymous.returncode == 1 and b"UNAUTHENTICATED" in anonymous.stderr
    applied = cp.cli("apply", "-f", str(tmp_path / "ratings.yaml"), *tls_args, "--token-file", str(admin))
    assert applied.returncode == 0 and b"ServiceEntry tutorial/ratings created" in applied.stdout, applied.stderr

    # a proxy with a tutorial token gets its identity; its worker serves with every renewed certificate
    proxy = start_proxy(procs, tmp_path, cp, tutorial, "tutorial")

    def identity_everywhere():
        identity = proxy.config_dump()["workload_identity"]
        serial = identity.get("serial")
        return serial and all(w["serial"] == serial for w in identity["workers"]) and identity

    first = proxy.wait_for(identity_everywhere, "an identity in supervisor and worker")
    assert first["spiffe_id"] == "spiffe://cluster.local/ns/tutorial/sa/reviews"
    assert proxy.config_dump()["controlplane"]["tls"] is True
    renewed = proxy.wait_for(lambda: (i := identity_everywhere()) and i["serial"] != first["serial"] and i,
                             "a renewed certificate in the worker", timeout_s=10)
    assert renewed["failures"] == 0
    status = cp.cli("proxy-status", "-o", "json", *tls_args, "--token-file", str(admin))
    assert status.returncode == 0 and b"spiffe://cluster.local/ns/tutorial/sa/reviews" in status.stdout
    table = cp.cli("proxy-status", *tls_args, "--token-file", str(admin))
    assert b"IDENTITY" in table.stdout and b"tutorial-1" in table.stdout, table.stderr

    # a tutorial token does not make a finance proxy
    intruder = start_proxy(procs, tmp_path, cp, tutorial, "finance", wait_ready=False)
    def refused():
        try:
            dump = intruder.config_dump()
        except OSError:  # its admin listener is not up yet
            return None
        return "PERMISSION_DENIED" in dump["controlplane"]["last_disconnect"] and dump

    refusal = intruder.wait_for(refused, "the refusal", timeout_s=15)
    assert "grants namespace 'tutorial', not 'finance'" in refusal["controlplane"]["last_disconnect"]
    assert refusal["workload_identity"]["spiffe_id"] == ""
    intruder.stop()

    # a restart reuses the CA directory: same root, and the proxy carries on with it
    cp.stop()
    again = start_controlplane(procs, tmp_path, ca_dir, "--workload-cert-ttl", "4s", port=cp.port)
    assert (ca_dir / "root-cert.pem").read_bytes() == root_pem
    loaded = [r for r in again.log_records() if r.get("event") == "ca_loaded"]
    assert loaded and loaded[0]["created"] is False
    before = identity_everywhere()["serial"]
    proxy.wait_for(lambda: proxy.config_dump()["controlplane"]["connects"] >= 2 and
                   (i := identity_everywhere()) and i["serial"] != before, "renewal after the restart", timeout_s=15)


def test_bad_ca_directory_stops_the_control_plane_with_the_reason(tmp_path):
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "ca-cert.pem").write_text("not a certificate")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "controlplane", "--ca-dir", str(ca_dir),
                        "--listen", "127.0.0.1:0"], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                       capture_output=True, timeout=30)
    assert r.returncode == 1
    assert b"ca_rejected" in r.stderr and b"missing ca-key.pem, cert-chain.pem, root-cert.pem" in r.stderr



def test_tls_is_the_default_and_plaintext_needs_the_explicit_flag(tmp_path):
    """Without --ca-dir the control plane makes its CA in the default data directory and serves TLS."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TRIOMESH_CA_DIR="", TRIOMESH_DATA_DIR="",
               XDG_STATE_HOME=str(tmp_path / "state"))
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "controlplane", "--listen", "127.0.0.1:0",
                             "--port-file", str(port_file)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        root = tmp_path / "state" / "triomesh" / "ca" / "root-cert.pem"
        status = triomesh("proxy-status", "--controlplane", f"127.0.0.1:{port_file.read_text().strip()}",
                          "--controlplane-ca", str(root))
        assert status.returncode == 1 and b"UNAUTHENTICATED" in status.stderr  # TLS verified; no admin token
    finally:
        proc.terminate()
        proc.wait(10)
    contradiction = triomesh("controlplane", "--insecure-plaintext", "--ca-dir", str(tmp_path / "ca"))
    assert contradiction.returncode == 2 and b"--ca-dir contradicts --insecure-plaintext" in contradiction.stderr
    proxy = triomesh("proxy", "--controlplane", "127.0.0.1:15010")
    assert proxy.returncode == 2 and b"--controlplane needs --controlplane-ca FILE" in proxy.stderr


def test_ca_cli_shows_and_rotates_the_root_in_three_steps(tmp_path):
    ca_dir = tmp_path / "ca"
    from controlplane.ca import CertificateAuthority

    first = CertificateAuthority.load_or_create(ca_dir, "cluster.local")
    shown = triomesh("controlplane", "ca", "show", "--ca-dir", str(ca_dir))
    assert shown.returncode == 0 and shown.stdout.count(b"trusted root ") == 1
    rotated = triomesh("controlplane", "ca", "rotate", "--ca-dir", str(ca_dir))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.count(b"trusted root ") == 2 and b"the current signer keeps signing" in rotated.stdout
    assert rotated.stdout.count(b"(waits to sign: `ca switch-signer`)") == 1
    added = CertificateAuthority.load(ca_dir, "cluster.local")
    assert added.roots[0] == first.roots[0] and added.signing_certificate == first.signing_certificate
    switched = triomesh("controlplane", "ca", "switch-signer", "--ca-dir", str(ca_dir))
    assert switched.returncode == 0 and b"signs from now on" in switched.stdout, switched.stderr
    assert CertificateAuthority.load(ca_dir, "cluster.local").signing_certificate == added.roots[1]
    dropped = triomesh("controlplane", "ca", "drop-old-roots", "--ca-dir", str(ca_dir))
    assert dropped.returncode == 0 and dropped.stdout.count(b"dropped root ") == 1, dropped.stderr
    assert dropped.stdout.count(b"trusted root ") == 1
    again = triomesh("controlplane", "ca", "switch-signer", "--ca-dir", str(ca_dir))
    assert again.returncode == 1 and b"no new root waits to sign" in again.stderr
    missing = triomesh("controlplane", "ca", "show", "--ca-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and b"incomplete CA directory" in missing.stderr
