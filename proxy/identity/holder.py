"""The one mutable reference a worker holds its workload identity in, swapped whole on renewal."""

from __future__ import annotations

from proxy.identity.workload import WorkloadIdentity


class IdentityHolder:
    """Readers (the TLS transport, per connection) take `holder.current` once and keep it; `swap`
    rebinds the reference. None until the control plane issued the first certificate."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: WorkloadIdentity | None = None

    def swap(self, identity: WorkloadIdentity) -> WorkloadIdentity | None:
        old, self.current = self.current, identity
        return old
