"""Outlier detection (DestinationRule trafficPolicy.outlierDetection): which hosts to eject and when
they come back. Pure: results and the clock are passed in; the caller rebuilds its balancer when
`version` changes.

Theory of operation, as Envoy's outlier detector does it for Istio's settings:
- each upstream result is recorded per host; a 5xx (or a local failure: connect failure, reset,
  timeout, counted as 503/504 unless splitExternalLocalOriginErrors is set, in which case those
  count toward consecutiveLocalOriginFailures alone) bumps the host's consecutive-5xx counter, and
  502/503/504 its consecutive-gateway counter; any other status resets them;
- reaching `consecutive_5xx` (or `consecutive_gateway`, when enabled) ejects the host at once, unless
  that would eject more than `max_ejection_percent` of the hosts (one host may always be ejected);
- an ejection lasts base_ejection_time x (number of times ejected), capped at max(base, 300 s);
  the sweep every `interval` returns hosts whose time is up, and lowers the multiplier of hosts that
  stayed healthy for an interval;
- when fewer than `min_health_percent` of the hosts are healthy, the balancer uses all of them
  (Envoy's panic threshold, which is what Istio programs minHealthPercent as).
"""

from __future__ import annotations

from typing import Generic, Hashable, Sequence, TypeVar

from proxy.config.snapshot import OutlierPolicy

H = TypeVar("H", bound=Hashable)

GATEWAY_ERRORS = frozenset({502, 503, 504})


class _HostState:
    __slots__ = ("consecutive_5xx", "consecutive_gateway", "consecutive_local", "ejected_until", "multiplier")

    def __init__(self) -> None:
        self.consecutive_local = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until: float | None = None
        self.multiplier = 0


class OutlierDetector(Generic[H]):
    __slots__ = ("policy", "hosts", "state", "next_sweep", "ejected", "version", "ejections_total")

    def __init__(self, hosts: Sequence[H], policy: OutlierPolicy, now: float) -> None:
        self.policy = policy
        self.hosts = tuple(hosts)
        self.state = {h: _HostState() for h in self.hosts}
        self.next_sweep = now + policy.interval_s
        self.ejected = 0
        self.version = 0  # bumped whenever the healthy set changes
        self.ejections_total = 0

    def record(self, host: H, status: int, now: float, local: bool = False) -> bool:
        """One upstream result: an HTTP status, or (`local`) a connect failure, reset or timeout
        given as 503/504. True if it ejected the host."""
        st = self.state.get(host)
        if st is None:
            return False
        p = self.policy
        if p.split_local_origin:
            if local:
                st.consecutive_local += 1
                if p.consecutive_local_origin and st.consecutive_local >= p.consecutive_local_origin:
                    return self._eject(st, now)
                return False
            st.consecutive_local = 0  # the host answered: its connection works
        if status >= 500:
            st.consecutive_5xx += 1
            if status in GATEWAY_ERRORS:
                st.consecutive_gateway += 1
            else:
                st.consecutive_gateway = 0
        else:
            st.consecutive_5xx = 0
            st.consecutive_gateway = 0
            return False
        if (p.consecutive_5xx and st.consecutive_5xx >= p.consecutive_5xx) or (
                p.consecutive_gateway and st.consecutive_gateway >= p.consecutive_gateway):
            return self._eject(st, now)
        return False

    def _eject(self, st: _HostState, now: float) -> bool:
        if st.ejected_until is not None:
            return False
        n = len(self.hosts)
        if self.ejected and 100.0 * (self.ejected + 1) / n > self.policy.max_ejection_percent:
            return False
        st.multiplier += 1
        p = self.policy
        duration = min(p.base_ejection_time_s * st.multiplier, max(p.base_ejection_time_s, p.max_ejection_time_s))
        st.ejected_until = now + duration
        st.consecutive_5xx = st.consecutive_gateway = st.consecutive_local = 0
        self.ejected += 1
        self.ejections_total += 1
        self.version += 1
        return True

    def sweep(self, now: float) -> int:
        """The periodic pass (call when now >= next_sweep): returns hosts brought back."""
        returned = 0
        for st in self.state.values():
            if st.ejected_until is not None:
                if now >= st.ejected_until:
                    st.ejected_until = None
                    self.ejected -= 1
                    returned += 1
            elif st.multiplier:
                st.multiplier -= 1
        if returned:
            self.version += 1
        self.next_sweep = now + self.policy.interval_s
        return returned

    def is_ejected(self, host: H) -> bool:
        st = self.state.get(host)
        return st is not None and st.ejected_until is not None

    def healthy(self) -> tuple[H, ...]:
        """The hosts to balance over: the non-ejected ones, or all of them below min_health_percent."""
        if not self.ejected:
            return self.hosts
        ok = tuple(h for h in self.hosts if self.state[h].ejected_until is None)
        if 100.0 * len(ok) / len(self.hosts) < self.policy.min_health_percent:
            return self.hosts
        return ok
