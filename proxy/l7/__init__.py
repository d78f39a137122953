"""L7: the HTTP pipeline (codec, stages, upstream exchange)."""
