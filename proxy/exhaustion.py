"""Which OS errors mean that this process (not the peer) ran out of a resource: descriptors,
kernel memory, socket buffers, ephemeral ports. Such a failure is answered (503, counted), never
taken for a client that went away, and never held against an upstream endpoint."""

from __future__ import annotations

import errno

# errno -> the `reason` label of the counters
_REASONS = {
    errno.EMFILE: "emfile",  # this process's RLIMIT_NOFILE
    errno.ENFILE: "enfile",  # the system-wide file table
    errno.ENOMEM: "enomem",
    errno.ENOBUFS: "enobufs",
    errno.EADDRNOTAVAIL: "eaddrnotavail",  # no ephemeral port left for an outgoing connection
}


def exhaustion_reason(err: int | None) -> str | None:
    """The counter label for a local resource exhaustion errno, None for any other error."""
    return _REASONS.get(err)  # type: ignore[arg-type]
