"""Builds BoringSSL, with its x86_64 assembly, and our cffi binding of it (`proxy.tls._boringssl`).

    python native/build_boringssl.py [--work DIR] [--jobs N]

Why: a new mutual TLS connection is mostly the TLS library's handshake, and BoringSSL built with
clang does a server's handshake in well under half of OpenSSL 4's time (docs/tls.md, "The TLS
library"). No package offers such a build here (Debian's is the Android snapshot without assembly),
so it is built from the sources PyPI's grpcio sdist carries (`third_party/boringssl-with-bazel`,
pinned below by version and SHA-256), with the file list grpcio itself builds from
(`src/python/grpcio/grpc_core_dependencies.py`) and every assembly file of the tree (each is guarded
by its own architecture and OS, so the others compile to nothing).

clang, not gcc: the P-256 arithmetic is C around ADX assembly, and gcc's code signs at less than
half clang's speed. Objects are position-independent and linked into the extension with their
symbols hidden (`--exclude-libs`), so they never interpose on the OpenSSL the stdlib's `ssl` loads.
Object files are kept in the work directory and rebuilt only when missing.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

GRPCIO_VERSION = "1.85.3"
GRPCIO_SHA256 = "8e18f15d1b09b8771edbf59d634b26cbe4903bc2577cb667264934a6655eb8b4"
TREE = "third_party/boringssl-with-bazel/"
FLAGS = ["-O2", "-DNDEBUG", "-fPIC", "-Wno-unused-parameter"]
ROOT = Path(__file__).resolve().parent.parent


def fetch_sdist(work: Path) -> Path:
    """The pinned sdist, found on PyPI's simple index (`pip download` would run grpcio's setup.py for
    its metadata, which needs grpcio's own build tools)."""
    target = work / f"grpcio-{GRPCIO_VERSION}.tar.gz"
    if not target.exists():
        with urllib.request.urlopen("https://pypi.org/simple/grpcio/", timeout=120) as response:
            index = response.read().decode("utf-8", "replace")
        links = [link for link in re.findall(r'href="([^"]+)"', index) if f"/{target.name}#" in link]
        if not links:
            raise SystemExit(f"PyPI's index lists no {target.name}")
        url = html.unescape(links[0]).split("#")[0]
        partial = target.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != GRPCIO_SHA256:
        raise SystemExit(f"{target}: SHA-256 {digest}, expected {GRPCIO_SHA256}")
    return target


def extract(sdist: Path, work: Path) -> Path:
    """The BoringSSL tree and grpcio's file list, under work/src (once)."""
    source = work / f"src-{GRPCIO_VERSION}"  # a new pinned version is extracted anew
    marker = source / ".extracted"
    if marker.exists():
        return source
    prefix = f"grpcio-{GRPCIO_VERSION}/"
    wanted = (prefix + TREE, prefix + "src/python/grpcio/grpc_core_dependencies.py")
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = member.name[len(prefix):]
                members.append(member)
        archive.extractall(source, members=members, filter="data")
    marker.touch()
    return source


def source_files(source: Path) -> tuple[list[str], list[str], list[str]]:
    """(crypto .cc, ssl .cc, assembly .S), relative to the BoringSSL tree."""
    tree = ast.parse((source / "src/python/grpcio/grpc_core_dependencies.py").read_text())
    listed: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "CORE_SOURCE_FILES":
            listed = [element.value for element in node.value.elts]
    ours = [name[len(TREE):] for name in listed if name.startswith(TREE) and name.endswith(".cc")]
    crypto = sorted(name for name in ours if not name.startswith("ssl/"))
    ssl = sorted(name for name in ours if name.startswith("ssl/"))
    assembly = sorted(str(path.relative_to(source / TREE)) for path in (source / TREE).rglob("*.S"))
    if not crypto or not ssl or not assembly:
        raise SystemExit("grpcio's file list names no BoringSSL sources: its layout changed")
    return crypto, ssl, assembly


def compile_one(tree: Path, objects: Path, name: str) -> Path:
    output = objects / (name + ".o")
    if output.exists():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler = ["clang++", "-std=c++17"] if name.endswith(".cc") else ["clang"]
    subprocess.run([*compiler, *FLAGS, "-I", str(tree / "include"), "-c", str(tree / name), "-o", str(output)],
                   check=True)
    return output


def archive(objects: list[Path], target: Path) -> None:
    target.unlink(missing_ok=True)
    subprocess.run(["ar", "rcs", str(target), *map(str, objects)], check=True)


def build_libraries(work: Path, jobs: int) -> tuple[Path, Path, Path]:
    """(libssl.a, libcrypto.a, include dir)."""
    source = extract(fetch_sdist(work), work)
    tree = source / TREE
    crypto, ssl, assembly = source_files(source)
    # objects of another compiler setting are not reused
    objects = work / f"obj-{GRPCIO_VERSION}-{hashlib.sha256(' '.join(FLAGS).encode()).hexdigest()[:12]}"
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        built = dict(zip(crypto + assembly + ssl,
                         pool.map(lambda name: compile_one(tree, objects, name), crypto + assembly + ssl)))
    libcrypto, libssl = work / "libcrypto.a", work / "libssl.a"
    archive([built[name] for name in crypto + assembly], libcrypto)
    archive([built[name] for name in ssl], libssl)
    return libssl, libcrypto, tree / "include"


def build_binding(libssl: Path, libcrypto: Path, include: Path, work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "native"))
    from boringssl_binding import CDEF, SOURCE
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("proxy.tls._boringssl", SOURCE, include_dirs=[str(include)],
                   extra_objects=[str(libssl), str(libcrypto)], libraries=["stdc++", "pthread"],
                   extra_link_args=["-Wl,--exclude-libs,ALL"], extra_compile_args=["-O2"])
    os.environ.setdefault("CC", "clang")
    built = ffi.compile(tmpdir=str(work / "binding"), verbose=False)
    target = ROOT / "proxy" / "tls" / Path(built).name
    os.replace(built, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "boringssl"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    libssl, libcrypto, include = build_libraries(work, args.jobs)
    print(build_binding(libssl, libcrypto, include, work))


if __name__ == "__main__":
    main()
