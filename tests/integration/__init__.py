"""Tests that run the real proxy with real backends and clients on loopback."""
