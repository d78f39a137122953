"""Sidecar traffic capture: iptables nat rules (rules.py, iptables.py) and a netns test lab (lab.py)."""
