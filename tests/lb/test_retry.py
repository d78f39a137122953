"""Retry conditions and back-off (pure)."""

from __future__ import annotations

from proxy.config.snapshot import RetryPolicy
from proxy.l7.errors import ConnectFailure, NoHealthyUpstream, Overflow, UpstreamReset, UpstreamTimeout
from proxy.l7.retry import backoff_s, retry_on_error, retry_on_status


def _p(on: str, codes=()) -> RetryPolicy:
    return RetryPolicy(num_retries=2, retry_on=frozenset(on.split(",")), retriable_status_codes=frozenset(codes))


def test_status_conditions():
    assert retry_on_status(_p("5xx"), 500, []) and retry_on_status(_p("5xx"), 503, [])
    assert not retry_on_status(_p("gateway-error"), 500, []) and retry_on_status(_p("gateway-error"), 504, [])
    assert retry_on_status(_p("retriable-4xx"), 409, []) and not retry_on_status(_p("retriable-4xx"), 404, [])
    assert retry_on_status(_p("retriable-status-codes", {418}), 418, [])
    assert not retry_on_status(_p("connect-failure", {418}), 418, []), "codes need retriable-status-codes"
    assert retry_on_status(_p("cancelled"), 200, [(b"grpc-status", b"1")])
    assert not retry_on_status(_p("cancelled"), 200, [(b"grpc-status", b"14")])
    assert not retry_on_status(_p("5xx"), 200, [])


def test_error_conditions():
    assert retry_on_error(_p("connect-failure"), ConnectFailure(), False)
    assert not retry_on_error(_p("connect-failure"), UpstreamReset(), False)
    assert retry_on_error(_p("reset"), UpstreamReset(), False) and retry_on_error(_p("reset"), ConnectFailure(), False)
    assert retry_on_error(_p("5xx"), UpstreamTimeout(), True)
    assert not retry_on_error(_p("5xx"), UpstreamTimeout(), False), "the overall timeout is final"
    assert not retry_on_error(_p("5xx"), Overflow(), False) and not retry_on_error(_p("5xx"), NoHealthyUpstream(), False)
    assert not retry_on_error(_p("refused-stream"), UpstreamReset(), False)


def test_backoff_is_jittered_exponential_and_capped():
    p = _p("5xx")
    assert backoff_s(p, 0, lambda: 0.999) < 0.025
    assert 0.049 < backoff_s(p, 1, lambda: 0.999) < 0.05
    assert backoff_s(p, 10, lambda: 0.999) < 0.25 and backoff_s(p, 10, lambda: 0.999) > 0.24
    assert backoff_s(p, 3, lambda: 0.0) == 0.0
