"""L4: TCP proxying, protocol sniffing, transparent listeners (SO_ORIGINAL_DST)."""
