"""The measured checkout's bytecode caches, written before a callgrind bench's two runs.

The instruction benches report the difference of two runs of different length. Compiling the proxy's
modules from source costs ~460M instructions under callgrind, so a `.pyc` written between the two runs
(by the first run itself, or by anything else started from the checkout, such as a test child without
PYTHONDONTWRITEBYTECODE) moves the result by that much: once by ~170k per request. Written first, the
caches are there for both runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def compile_checkout(source: Path, packages: tuple[str, ...] = ("proxy",)) -> None:
    """Write the `.pyc` of `source`'s packages; a failure (read-only checkout, a file that does not
    compile) is reported and the bench goes on, as it did before."""
    for package in packages:
        result = subprocess.run([sys.executable, "-m", "compileall", "-q", str(source / package)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            print(f"bench: could not compile {source / package} ahead of the runs (figures may move by its "
                  f"compile cost): {result.stdout.strip()[-500:]}", file=sys.stderr)
