"""TLS and mTLS for listeners and upstreams."""
