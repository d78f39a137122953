"""`triomesh validate`: check Istio config files as `istioctl validate`/`analyze` would, and report every
finding (schema errors per document, then cross-resource findings) with its code and level.

Exit status: 0 when no finding reaches --failure-threshold (Error by default; warnings pass), 1 when
one does, 2 for usage errors and paths that cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import yaml

from proxy.config import findings as codes
from proxy.config.analysis import analyze
from proxy.config.compile import compile_resources
from proxy.config.errors import ConfigError
from proxy.config.findings import Finding, Level, Origin
from proxy.config.istio import KINDS
from proxy.config.load import STDIN, DocumentError, LoadedSources, load_sources
from proxy.config.snapshot import Snapshot

OUTPUTS = ("log", "json", "yaml")


def _level(text: str) -> Level:
    try:
        return Level.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triomesh validate",
        description="Check Istio config (Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, "
        "Sidecar, AuthorizationPolicy, PeerAuthentication) the way `triomesh proxy` would load it, and report "
        "every problem with an istioctl analyze code.",
    )
    parser.add_argument("paths", nargs="*", metavar="FILE|DIR|-",
                        help="a YAML file, a directory of *.yaml/*.yml files, or - for standard input")
    parser.add_argument("-f", "--filename", dest="files", action="append", default=[], metavar="PATH",
                        help="a file, directory or - to check (repeatable, as istioctl's -f)")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="log",
                        help="log: one line per finding (default); json or yaml: a list of findings")
    parser.add_argument("--failure-threshold", "--fail-on", dest="threshold", type=_level, default=Level.ERROR,
                        metavar="LEVEL", help="lowest level that makes the exit status 1: Error (default), Warning or Info")
    return parser


def _schema_finding(problem: DocumentError) -> Finding:
    e = problem.error
    namespace, _, name = e.name.partition("/")
    origin = Origin(e.kind, namespace, name, e.file, e.document, problem.line)
    if problem.problem == "yaml":
        return Finding(codes.INVALID_YAML, e.message, origin, e.field_path)
    if problem.problem == "duplicate":
        return Finding(codes.DUPLICATE_RESOURCE, e.message, origin, e.field_path)
    return Finding(codes.SCHEMA_VALIDATION_ERROR, f"Schema validation error: {e.field_path}: {e.message}", origin,
                   e.field_path)


def _compile_finding(loaded: LoadedSources, e: ConfigError) -> Finding:
    namespace, _, name = e.name.partition("/")
    line = loaded.line(e.file, e.document, e.field_path)
    origin = Origin(e.kind, namespace, name, e.file, e.document, line)
    return Finding(codes.NOT_ACCEPTED_BY_COMPILER, f"Not accepted by triomesh: {e.field_path}: {e.message}", origin,
                   e.field_path)


def run_checks(loaded: LoadedSources) -> tuple[list[Finding], Snapshot | None]:
    """Every finding for what was loaded, and the compiled snapshot when the config would load.

    The compiler runs only when every document decoded (a missing resource would make it report
    references to it), and its error is dropped when a finding already points at the same field."""
    out = [_schema_finding(p) for p in loaded.errors]
    # references to a kind of which a document failed to decode are not checked: it may be that one
    undecoded = {p.error.kind for p in loaded.errors if p.problem == "schema" and p.error.kind in KINDS}
    for f in analyze(loaded.resources, undecoded):
        line = loaded.line(f.origin.file, f.origin.document, f.field_path)
        out.append(dataclasses.replace(f, origin=dataclasses.replace(f.origin, line=line)))
    if loaded.errors:
        return out, None
    try:
        snapshot = compile_resources(loaded.resources, version="validate")
    except ConfigError as e:
        already = any((f.origin.file, f.origin.document, f.field_path) == (e.file, e.document, e.field_path)
                      for f in out if f.level is Level.ERROR)
        if not already:
            out.append(_compile_finding(loaded, e))
        return out, None
    return out, snapshot


def _summary(loaded: LoadedSources, snapshot: Snapshot) -> str:
    counts: dict[str, int] = {}
    for r in loaded.resources:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
    return (f"ok: {len(loaded.resources)} resources ({kinds}); "
            f"{len(snapshot.listeners)} listeners, {len(snapshot.clusters)} clusters")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = [*args.paths, *args.files]
    if not paths:
        parser.error("no config to check: give files, directories, -f PATH or - for standard input")
    try:
        loaded = load_sources(paths, stdin=sys.stdin.buffer)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found, snapshot = run_checks(loaded)
    failed = any(f.level.rank >= args.threshold.rank for f in found)
    try:
        _report(args.output, found, loaded, snapshot, failed)
    except BrokenPipeError:  # `validate -o json | head`: the reader is gone, the verdict stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 1 if failed else 0


def _report(output: str, found: list, loaded, snapshot, failed: bool) -> None:
    if output == "json":
        print(json.dumps([f.as_dict() for f in found], indent=2))
    elif output == "yaml":
        print(yaml.safe_dump([f.as_dict() for f in found], sort_keys=False), end="")
    else:
        for f in found:
            print(f)
        errors = sum(f.level is Level.ERROR for f in found)
        if snapshot is not None and not failed:
            print(_summary(loaded, snapshot))
        elif failed:
            print(f"error: {errors} error(s), {len(found) - errors} warning(s) and info(s) in {len(loaded.files)} file(s)",
                  file=sys.stderr)
    sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
