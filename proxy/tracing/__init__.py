"""Distributed tracing: trace-context propagation (B3, W3C), sampling, Zipkin v2 spans and their export."""
