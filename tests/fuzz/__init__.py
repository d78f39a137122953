"""Coverage-guided fuzzing (atheris/libFuzzer) of the parsers that face untrusted or hand-written input.

Each target is a module `fuzz_<name>.py` with `check(data: bytes)`: the property every input must
satisfy (only the documented exceptions escape, plus cheap invariants), and `MAX_LEN`. The property
is plain Python, so the seed corpus (corpus/<name>/) and every crash found (test_regressions.py) run as
ordinary pytest tests without atheris; test_fuzz.py runs each target under atheris for a bounded time,
and `python -m tests.fuzz <name>... --seconds N` runs longer on demand (see the README).
"""

TARGETS = ("config", "sniff", "wire", "chunked", "h2", "hpack", "hpack_encoder")
