"""The proxy side of the control-plane protocol (see docs/controlplane-protocol.md)."""
