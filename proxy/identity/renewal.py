"""When to renew a workload certificate, and how long to wait after a failed attempt. Pure: the
caller passes the clock and the randomness.

Istio renews once half of a certificate's lifetime has passed (SECRET_GRACE_PERIOD_RATIO 0.5) with a
little jitter, so that proxies started together do not all ask at the same moment. A failed attempt
is retried with exponential back-off and full jitter, never later than shortly before expiry, while
the current certificate keeps serving.
"""

from __future__ import annotations

import random

RENEW_AT_LIFETIME_RATIO = 0.5
JITTER_RATIO = 0.1  # renew between 45% and 55% of the lifetime
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


MIN_RENEWAL_INTERVAL_S = 0.5  # however short-lived the certificates, renewals never spin


def renew_at(received_at: float, not_after: float, rng: random.Random) -> float:
    """The lifetime counts from when the certificate arrived, not from its not-before, which the CA
    backdates for lagging clocks (with a short TTL the backdating would be most of the lifetime)."""
    lifetime = max(0.0, not_after - received_at)
    ratio = RENEW_AT_LIFETIME_RATIO + rng.uniform(-JITTER_RATIO / 2, JITTER_RATIO / 2)
    return received_at + max(lifetime * ratio, MIN_RENEWAL_INTERVAL_S)


def retry_delay(attempt: int, *, not_after: float | None, now: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (0-based). With a certificate still held, at most a tenth
    of its remaining life, so several attempts fit before it expires."""
    delay = rng.uniform(0, min(RETRY_MAX_S, RETRY_INITIAL_S * 2.0 ** min(attempt, 32)))
    if not_after is not None and not_after > now:
        delay = min(delay, (not_after - now) / 10)
    return max(delay, 0.05)
