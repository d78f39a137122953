"""Request/response stages of the L7 chain (see proxy/l7/chain.py)."""
