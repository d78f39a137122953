"""Knowing when the --config files are complete: an inotify watch (Linux, through ctypes) that tells
which config files a writer still has open, and wakes the supervisor when the directory changes.

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
from pathlib import Path

import trio

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
