"""The inotify watch with real files: a config file counts as being written from its first write to
its writer's close, a rename into place or a `..data` swap is a change, other files are not writes."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from proxy.runner.config_watch import IN_CLOSE_WRITE, IN_MODIFY, IN_Q_OVERFLOW, ConfigWatch, WriteTracker


async def _settle(watch: ConfigWatch) -> None:
    with trio.move_on_after(0.2):
        while True:
            await watch.wait_events()


def test_tracker_open_until_closed_and_overflow_forgets() -> None:
    t = WriteTracker()
    t.event(IN_MODIFY, "a.yaml")
    assert t.writing == {"a.yaml"} and t.take_changed() and not t.take_changed()
    t.event(IN_CLOSE_WRITE, "a.yaml")
    assert t.writing == set()
    t.event(IN_MODIFY, "b.yaml")
    t.event(IN_Q_OVERFLOW, "")
    assert t.writing == set() and t.generation == 4


async def test_file_being_written_until_its_writer_closes(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text("a: 1\n")
    watch = ConfigWatch.open(tmp_path)
    assert watch is not None
    try:
        with open(tmp_path / "gw.yaml", "w") as f:
            f.write("a: ")
            f.flush()
            await _settle(watch)
            assert watch.being_written() == ["gw.yaml"]
            f.write("2\n")
        await _settle(watch)
        assert watch.being_written() == []
        assert watch.tracker.take_changed()
    finally:
        watch.close()


async def test_single_file_watch_ignores_other_names_and_sees_renames(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("a: 1\n")
    watch = ConfigWatch.open(config)
    assert watch is not None
    try:
        with open(tmp_path / ".gw.yaml.swp", "w") as f:  # an editor's swap file, held open
            await _settle(watch)
            watch.tracker.take_changed()  # a file created may be a config update; its writes are not
            f.write("x")
            f.flush()
            await _settle(watch)
            assert watch.being_written() == [] and not watch.tracker.take_changed()
        staged = tmp_path / "staged"
        staged.write_text("a: 2\n")
        os.rename(staged, config)
        await _settle(watch)
        assert watch.tracker.take_changed() and watch.being_written() == []
    finally:
        watch.close()


async def test_data_symlink_swap_is_a_change(tmp_path: Path) -> None:
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "gw.yaml").write_text("a: 1\n")
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/gw.yaml", tmp_path / "gw.yaml")
    watch = ConfigWatch.open(tmp_path)
    assert watch is not None
    try:
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "gw.yaml").write_text("a: 2\n")
        await _settle(watch)
        watch.tracker.take_changed()  # creating the new directory
        os.symlink("..v2", tmp_path / "..data_tmp")
        await _settle(watch)
        watch.tracker.take_changed()
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        await _settle(watch)
        assert watch.tracker.take_changed()
    finally:
        watch.close()


async def test_watch_of_a_replaced_directory_reports_it_lost(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    watch = ConfigWatch.open(config)
    assert watch is not None
    try:
        os.rename(config, tmp_path / "old")
        config.mkdir()  # a new directory under the old name: the supervisor opens a new watch
        os.rmdir(tmp_path / "old")
        await _settle(watch)
        assert not watch.alive
    finally:
        watch.close()
