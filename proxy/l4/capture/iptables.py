"""Install, remove and show the capture rules in a network namespace, with iptables-restore.

Each change is ONE `iptables-restore --noflush` transaction (all rules or none, never a half
installed capture), built by rules.py from what `iptables-save -t nat` reports right before, so
that install is idempotent and remove deletes exactly our jumps and chains and nothing else.

Namespace entry: we run the iptables binaries under `ip netns exec NS`. A namespace switch made with
setns() applies to the calling thread only, and ours may be a Trio process with worker threads; a
child process is the unit whose namespace can be set without touching anything else in ours.
`ip netns exec` is also how an operator would reach the same namespace by hand, so what the
tests check is what a person would see. (pyroute2 handles namespaces and links in lab.py; it has
no iptables API.) Without a namespace the commands run in our own.

Synchronous (it runs short subprocesses): call from the CLI, tests, or trio.to_thread.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Sequence

from proxy.l4.capture import rules
from proxy.l4.capture.rules import CaptureOptions, Family

_TIMEOUT_S = 30.0
# wait for the xtables lock instead of failing when another iptables runs (legacy backend)
_LOCK_WAIT_S = "5"


class CaptureError(Exception):
    """An iptables command failed; the message carries its stderr."""


def _tool(family: Family, name: str) -> str:
    return ("iptables-" if family == 4 else "ip6tables-") + name


def _in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def _run(netns: str | None, argv: Sequence[str], stdin_text: str | None = None) -> str:
    cmd = _in_netns(netns, argv)
    try:
        done = subprocess.run(cmd, input=stdin_text, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise CaptureError(f"{cmd[0]} not found (install the iptables package)") from exc
    except subprocess.TimeoutExpired as exc:
        raise CaptureError(f"{' '.join(cmd)} timed out after {_TIMEOUT_S}s") from exc
    if done.returncode != 0:
        raise CaptureError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def available(family: Family = 4) -> bool:
    """Whether the restore/save tools for this family are installed."""
    return shutil.which(_tool(family, "restore")) is not None and shutil.which(_tool(family, "save")) is not None


def save_nat(*, netns: str | None = None, family: Family = 4) -> str:
    """`iptables-save -t nat` in the namespace (empty text when the nat table does not exist yet)."""
    return _run(netns, [_tool(family, "save"), "-t", "nat"])


def restore(text: str, *, netns: str | None = None, family: Family = 4) -> None:
    """Apply iptables-restore text as one transaction, leaving other tables and rules alone."""
    _run(netns, [_tool(family, "restore"), "-w", _LOCK_WAIT_S, "--noflush"], stdin_text=text)


def install_plan(options: CaptureOptions, *, netns: str | None = None, family: Family = 4) -> str:
    """The restore text `install` would apply right now (reads the current rules; changes nothing)."""
    return rules.install_text(options, family, existing_jumps=rules.jumps_to_us(save_nat(netns=netns, family=family)))


def install(options: CaptureOptions, *, netns: str | None = None, family: Family = 4) -> str:
    """Install (or replace) the capture rules; returns the restore text applied."""
    text = install_plan(options, netns=netns, family=family)
    restore(text, netns=netns, family=family)
    return text


def remove(*, netns: str | None = None, family: Family = 4) -> str | None:
    """Delete our jump rules and chains. Returns the restore text applied, None if nothing was there."""
    current = save_nat(netns=netns, family=family)
    jumps = rules.jumps_to_us(current)
    chains = rules.chains_of_ours(current)
    if not jumps and not chains:
        return None
    text = rules.remove_text(jumps, chains)
    restore(text, netns=netns, family=family)
    return text


def show(*, netns: str | None = None, family: Family = 4) -> list[str]:
    """Our chain declarations and rules as iptables-save prints them."""
    current = save_nat(netns=netns, family=family)
    return [
        line
        for line in current.splitlines()
        if line.startswith(":" + rules.CHAIN_PREFIX) or (line.startswith("-A") and rules.CHAIN_PREFIX in line)
    ]
