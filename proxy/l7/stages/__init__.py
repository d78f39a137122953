"""Request/response stages: each one continues or answers."""
