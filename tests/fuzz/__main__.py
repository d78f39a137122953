"""Run fuzz targets under atheris: `python -m tests.fuzz [TARGET...] [--seconds N] [--seed S] [--keep DIR]`.

Each target runs in its own process (atheris ends the process when the run is over) for `--seconds`,
starting from its seed corpus (corpus/<target>/, read only) with a fixed libFuzzer seed. New inputs
go to a temporary directory, or to DIR/<target>/ with `--keep` (pass it again to resume). A crash
writes its input to the artifact directory (printed) and makes the exit status non-zero. The last
line per target sums the run up: executions, exec/s, coverage (libFuzzer's cov/ft counters)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz import TARGETS

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REPO = HERE.parent.parent


@dataclass(frozen=True)
class RunResult:
    target: str
    returncode: int
    output: str
    runs: int
    execs_per_s: int
    cov: int
    features: int
    crash_files: tuple[str, ...]

    def summary(self) -> str:
        verdict = "no crash" if self.returncode == 0 else f"FAILED (exit {self.returncode}), inputs: " + (
            ", ".join(self.crash_files) or "none written")
        return (f"fuzz {self.target}: {self.runs} runs, {self.execs_per_s} exec/s, cov {self.cov}, "
                f"ft {self.features}: {verdict}")


def _stat(output: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s*(\d+)", output)
    return int(m.group(1)) if m else 0


def run_target(target: str, seconds: int, seed: int = 1, keep: Path | None = None) -> RunResult:
    """Fuzz one target in a child process for `seconds`; its output is returned, not printed."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as tmp:
        work = keep / target if keep else Path(tmp) / "corpus"
        work.mkdir(parents=True, exist_ok=True)
        # crash inputs must outlive the temporary directory
        artifacts = keep / "artifacts" / target if keep else Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-crash-"))
        artifacts.mkdir(parents=True, exist_ok=True)
        args = [f"-max_total_time={seconds}", f"-seed={seed}", "-timeout=10", "-rss_limit_mb=2048",
                f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(work), str(CORPUS / target)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "tests.fuzz._child", target, *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        output = proc.stdout
        cov = re.findall(r"cov: (\d+) ft: (\d+)", output)
        crashes = tuple(str(p) for p in sorted(artifacts.iterdir()))
        if not crashes and not keep:
            artifacts.rmdir()
        return RunResult(target, proc.returncode, output, _stat(output, "number_of_executed_units"),
                         _stat(output, "average_exec_per_sec"), int(cov[-1][0]) if cov else 0,
                         int(cov[-1][1]) if cov else 0, crashes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET",
                        help=f"one or more of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default 1)")
    parser.add_argument("--keep", type=Path, help="keep the grown corpus (and crashes) under this directory")
    parser.add_argument("--verbose", action="store_true", help="print libFuzzer's whole output")
    options = parser.parse_args(argv)
    failed = 0
    for target in options.targets or TARGETS:
        result = run_target(target, options.seconds, options.seed, options.keep)
        if options.verbose or result.returncode:
            print(result.output)
        print(result.summary(), flush=True)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
