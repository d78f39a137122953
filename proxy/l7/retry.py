"""Retry decisions (Envoy's retry_on conditions) and jittered exponential back-off. Pure.

Which outcome each condition retries (HTTP/1.1 upstreams):
- `5xx`: any 5xx response, and every failure without a response (connect failure, reset, per-try
  timeout, malformed response);
- `gateway-error`: 502, 503, 504 responses, connect failures, resets and per-try timeouts (they
  become 503/504);
- `connect-failure`: connect failure or connect timeout; `reset` / `reset-before-request`: the
  upstream closed or reset before a response (connect failures included, as Envoy counts them);
- `retriable-4xx`: 409; `retriable-status-codes`: the route's codes (numbers in retryOn);
- `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`: the gRPC status
  in a `grpc-status` response header (1, 4, 13, 8, 14);
- `refused-stream` (HTTP/2 REFUSED_STREAM), `envoy-ratelimited`, `retriable-headers`,
  `http3-post-connect-failure` are accepted and never match on an HTTP/1.1 upstream.
The overall route timeout and a connection-pool overflow are never retried.
"""

from __future__ import annotations

from typing import Callable

from proxy.config.snapshot import RetryPolicy
from proxy.l7.errors import ConnectFailure, ProxyError, UpstreamProtocolError, UpstreamReset, UpstreamTimeout

_GRPC = {b"1": "cancelled", b"4": "deadline-exceeded", b"13": "internal", b"8": "resource-exhausted",
         b"14": "unavailable"}
_GRPC_CONDITIONS = frozenset(_GRPC.values())
_GATEWAY = frozenset({502, 503, 504})


def retry_on_status(policy: RetryPolicy, status: int, headers) -> bool:
    on = policy.retry_on
    if status < 300:  # only a gRPC status in a 2xx response can still ask for a retry
        if not on.isdisjoint(_GRPC_CONDITIONS):
            for name, value in headers:
                if name == b"grpc-status":
                    return _GRPC.get(value, "") in on
        return False
    if status >= 500 and "5xx" in on:
        return True
    if status in _GATEWAY and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    if on & _GRPC_CONDITIONS:
        for name, value in headers:
            if name == b"grpc-status":
                return _GRPC.get(value, "") in on
    return False


def retry_on_error(policy: RetryPolicy, error: ProxyError, per_try_timeout: bool) -> bool:
    on = policy.retry_on
    if isinstance(error, UpstreamTimeout):
        # only a per-try timeout is retried; the overall route timeout ends the request
        return per_try_timeout and bool(on & {"5xx", "gateway-error", "reset"})
    if isinstance(error, ConnectFailure):
        return bool(on & {"5xx", "gateway-error", "connect-failure", "reset", "reset-before-request"})
    if isinstance(error, (UpstreamReset, UpstreamProtocolError)):
        return bool(on & {"5xx", "gateway-error", "reset"})
    return False


def backoff_s(policy: RetryPolicy, retry_index: int, random: Callable[[], float]) -> float:
    """Envoy's jittered exponential back-off: uniform in [0, min(base * 2^n, max))."""
    upper = policy.backoff_base_s * (1 << min(retry_index, 30))
    if upper > policy.backoff_max_s:
        upper = policy.backoff_max_s
    return random() * upper
