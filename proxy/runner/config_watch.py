"""Knowing when config files are complete: an inotify watch (Linux, through ctypes) that tells which
config files a writer still has open and wakes the reader when the directory changes, and the rule
for reading them (`read_complete`), shared by `triomesh proxy --config` and
`triomesh controlplane --config`.

Theory of operation: a file rewritten in place (`generate > gateway.yaml`) is truncated first and
then filled; reading it in between gives half a config. The kernel says when a writer is done: every
write raises IN_MODIFY, the writer's close raises IN_CLOSE_WRITE, a rename into the directory raises
IN_MOVED_TO (also how a Kubernetes ConfigMap update lands: a new `..data` symlink renamed over the old
one). So a config file counts as "being written" from its first IN_MODIFY until its IN_CLOSE_WRITE
(or until it is renamed over, or deleted), and the supervisor reads the files only when none is.

Why inotify rather than a stability rule alone (same size, mtime and content across two reads a
short settle delay apart): a writer that pauses longer than the settle delay (a slow generator, a
network copy) would get its first half applied. Why not scan /proc/*/fd for writers: it sees only
this user's processes and costs a walk over every process. Where inotify is missing (not Linux,
or the per-user watch limit reached) only the stability rule applies, and the README says to
rename complete files into place, which is safe either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import trio

from proxy.runner.config_source import Fingerprint, Sources, content_digest, fingerprint

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class WriteTracker:
    """Pure bookkeeping of inotify events: which names a writer has open, and whether anything in
    the directory changed since the last `take_changed()`."""

    def __init__(self) -> None:
        self.writing: set[str] = set()
        self.changed = False
        self.generation = 0  # moves on every event: a read spanning no event saw one state

    def event(self, mask: int, name: str) -> None:
        self.generation += 1
        self.changed = True
        if mask & IN_MODIFY:
            self.writing.add(name)
        elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE):
            self.writing.discard(name)
        if mask & IN_Q_OVERFLOW:  # events were lost: nothing is known to be open any more
            self.writing.clear()

    def take_changed(self) -> bool:
        changed, self.changed = self.changed, False
        return changed


def parse_events(buf: bytes) -> list[tuple[int, str]]:
    """(mask, name) of each event in one read() of an inotify fd."""
    out = []
    pos = 0
    while pos + _EVENT.size <= len(buf):
        _, mask, _, length = _EVENT.unpack_from(buf, pos)
        name = buf[pos + _EVENT.size: pos + _EVENT.size + length].split(b"\0", 1)[0]
        out.append((mask, os.fsdecode(name)))
        pos += _EVENT.size + length
    return out


class ConfigWatch:
    """An inotify watch on the directory holding the config (the --config directory itself, or a
    single file's parent directory). `open()` returns None where inotify is unavailable."""

    def __init__(self, fd: int, directory: Path, config_names: frozenset[str] | None) -> None:
        self._fd = fd
        self.directory = directory
        self._config_names = config_names  # None: every *.yaml/*.yml of the directory
        self.tracker = WriteTracker()
        self.alive = True  # False once the kernel dropped the watch (the directory was removed or replaced)

    @classmethod
    def open(cls, config_path: Path) -> ConfigWatch | None:
        path = Path(os.path.abspath(config_path))
        if path.is_dir():
            directory, names = path, None
        else:
            directory, names = path.parent, frozenset({path.name})
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
            os.close(fd)
            return None
        return cls(fd, directory, names)

    def is_config_name(self, name: str) -> bool:
        if self._config_names is not None:
            return name in self._config_names
        return name.endswith((".yaml", ".yml"))

    def being_written(self) -> list[str]:
        """Config files a writer has modified and not yet closed."""
        return sorted(n for n in self.tracker.writing if self.is_config_name(n))

    def read_nowait(self) -> None:
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for mask, name in parse_events(buf):
                if mask & IN_IGNORED:
                    self.alive = False
                    continue
                # an editor's swap file being written next to the config is no config being written,
                # but any rename, creation or removal may be a config update (a `..data` swap)
                if self.is_config_name(name) or mask & (IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE
                                                        | IN_DELETE_SELF | IN_MOVE_SELF | IN_Q_OVERFLOW):
                    self.tracker.event(mask, name)

    async def wait_events(self) -> None:
        """Until at least one event arrived (and is recorded)."""
        await trio.lowlevel.wait_readable(self._fd)
        self.read_nowait()

    def close(self) -> None:
        os.close(self._fd)


# ---- reading complete files: the one rule for every reader of a watched config path (`triomesh proxy
# --config` and `triomesh controlplane --config`)

QUIET_S = 0.2  # a burst of file events (a directory written file by file) is read once it is this quiet
SETTLE_S = 0.2  # two reads this far apart must agree before a config counts as complete
READ_ATTEMPTS = 5  # files still changing after this many settle rounds are read at the next event or poll


class CompleteRead(NamedTuple):
    sources: Sources
    fingerprint: Fingerprint  # taken before the reads: a write after them shows as a change


class Deferred(NamedTuple):
    """Not read this time: `files` are open for writing, or the files kept changing."""
    detail: str
    files: list[str]


def files_being_written(watch: ConfigWatch | None) -> list[str]:
    if watch is None:
        return []
    watch.read_nowait()
    return watch.being_written()


async def wait_file_events(watch: ConfigWatch | None, poll_interval_s: float) -> None:
    """Until a burst of file events has been quiet for QUIET_S, or poll_interval_s passed (a missed
    event, no inotify)."""
    with trio.move_on_after(poll_interval_s):
        if watch is None:
            await trio.sleep_forever()
        await watch.wait_events()
        while True:
            with trio.move_on_after(QUIET_S) as quiet:
                await watch.wait_events()
            if quiet.cancelled_caught:
                return


def reopen_if_replaced(watch: ConfigWatch | None, path: Path) -> tuple[ConfigWatch | None, bool]:
    """A watch whose directory was removed or replaced is opened again on the path once it exists
    (polling covers the time until then). True when it was reopened."""
    if watch is None or watch.alive or not path.exists():
        return watch, False
    watch.close()
    return ConfigWatch.open(path), True


async def read_complete(path: Path, watch: ConfigWatch | None, read: Callable[[], Sources]) -> CompleteRead | Deferred:
    """The config files as their writers left them: no writer has one open (inotify) and two reads
    SETTLE_S apart saw the same files and bytes with no file event in between. `read` reads the
    files (its errors pass through)."""
    for _ in range(READ_ATTEMPTS):
        writing = files_being_written(watch)
        if writing:
            return Deferred("file open for writing", writing)
        generation, before = _generation(watch), fingerprint(path)
        first = read()
        await trio.sleep(SETTLE_S)
        if files_being_written(watch):
            continue
        second = read()
        if (generation == _generation(watch) and fingerprint(path) == before
                and content_digest(first) == content_digest(second)):
            return CompleteRead(second, before)
    return Deferred("files still changing", [])


def _generation(watch: ConfigWatch | None) -> int:
    return watch.tracker.generation if watch is not None else 0
