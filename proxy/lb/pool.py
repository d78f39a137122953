"""Idle upstream connections per endpoint: sync bookkeeping, the caller does the IO.

`checkout` hands back the most recently used idle connection (LIFO keeps few connections warm) and
the expired ones the caller must close; `checkin` parks a connection that finished a response
cleanly. Nothing here awaits, so it cannot be interrupted half-way.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class IdlePool(Generic[T]):
    __slots__ = ("idle", "max_idle", "idle_timeout_s")

    def __init__(self, *, max_idle: int = 1024, idle_timeout_s: float = 60.0) -> None:
        self.idle: list[tuple[T, float]] = []
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s

    def checkout(self, now: float) -> tuple[T | None, list[T] | tuple[()]]:
        """(a reusable connection or None, connections to close)."""
        idle = self.idle
        if idle:  # the common case: the newest is fresh and so is the oldest, nothing to close
            timeout = self.idle_timeout_s
            if now - idle[-1][1] <= timeout and now - idle[0][1] <= timeout:
                return idle.pop()[0], ()
        expired: list[T] = []
        while idle:
            conn, since = idle.pop()
            if now - since <= self.idle_timeout_s:
                if idle and now - idle[0][1] > self.idle_timeout_s:
                    expired.extend(self.drop_expired(now))
                return conn, expired
            expired.append(conn)
        return None, expired

    def drop_expired(self, now: float) -> list[T]:
        """Take out the connections idle for longer than the timeout (the caller closes them)."""
        cutoff = now - self.idle_timeout_s
        keep = [(c, t) for c, t in self.idle if t >= cutoff]
        gone = [c for c, t in self.idle if t < cutoff]
        self.idle = keep
        return gone

    def checkin(self, conn: T, now: float) -> T | None:
        """Park `conn`; returns a connection to close when the pool is full (the oldest)."""
        self.idle.append((conn, now))
        if len(self.idle) > self.max_idle:
            return self.idle.pop(0)[0]
        return None

    def drop_where(self, unwanted) -> list[T]:
        """Take out the connections `unwanted(conn)` is true for (the caller closes them)."""
        gone = [c for c, _ in self.idle if unwanted(c)]
        if gone:
            self.idle = [(c, t) for c, t in self.idle if not unwanted(c)]
        return gone

    def drain(self) -> list[T]:
        conns = [c for c, _ in self.idle]
        self.idle = []
        return conns
