"""A proxy that serves no TLS pays nothing for it: `cryptography` (~9 MiB per process) is imported only
where a certificate is parsed, never by the modules a supervisor and its workers load at start."""

from __future__ import annotations

import subprocess
import sys


def test_proxy_processes_start_without_cryptography():
    code = ("import sys\n"
            "import proxy.cli, proxy.runner.supervisor, proxy.runner.worker\n"
            "import proxy.l7.dataplane, proxy.l4.transparent, proxy.l4.gateway_tcp, proxy.tls.listener\n"
            "print('cryptography' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
