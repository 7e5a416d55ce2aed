"""kenstream.io.safefs: descriptors are not leaked, whether a path is entered or refused."""

from __future__ import annotations

import os

import pytest

from kenstream.io.safefs import open_dir_inside


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def test_entering_folders_part_by_part_keeps_one_descriptor(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    before = _open_fds()
    fd = open_dir_inside(tmp_path, ["a", "b", "c"])
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a" / "b" / "c"))
        assert len(_open_fds() - before) == 1  # the one returned, none of the parts
    finally:
        os.close(fd)
    assert _open_fds() == before


@pytest.mark.parametrize("parts", [["a", "missing"], ["a", "link"], ["a", "file"]])
def test_a_part_that_cannot_be_entered_leaves_no_descriptor_open(tmp_path, parts):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "file").write_text("x")
    os.symlink(tmp_path, tmp_path / "a" / "link")
    before = _open_fds()
    with pytest.raises(OSError):
        open_dir_inside(tmp_path, parts)
    assert _open_fds() == before


def test_an_interrupt_while_locking_propagates_and_closes_the_lock_file(tmp_path,
                                                                       monkeypatch):
    """Ctrl-C landing in the flock is not swallowed (the run would go on unlocked), and
    the lock file's descriptor is closed on the way out."""
    from kenstream.io import safefs

    def interrupted(fd, op):
        raise KeyboardInterrupt

    monkeypatch.setattr(safefs.fcntl, "flock", interrupted)
    before = _open_fds()
    lock = safefs.DirLock(tmp_path, ".kenstream.lock")
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert lock._fd is None
    assert _open_fds() == before


def test_a_refused_input_leaves_no_descriptor_open(tmp_path):
    """open_regular refuses a folder or a FIFO after opening it: the descriptor it opened
    to look is closed (a run refusing many inputs would run out of them)."""
    from kenstream.errors import CheckpointError
    from kenstream.io.safefs import open_regular

    os.mkfifo(tmp_path / "pipe")
    before = _open_fds()
    for path, kind in ((tmp_path, "a directory"), (tmp_path / "pipe", "not a regular file")):
        with pytest.raises(CheckpointError, match=f"file is {kind}"):
            open_regular(path)
    assert _open_fds() == before


def test_a_lock_held_elsewhere_is_refused_without_leaking_its_descriptor(tmp_path):
    """A second writer is refused in one line, and the descriptor it opened to try the
    lock is closed."""
    from kenstream.errors import OutputError
    from kenstream.io.safefs import DirLock

    with DirLock(tmp_path, ".kenstream.lock"):
        before = _open_fds()
        with pytest.raises(OutputError, match="another kenstream run is writing here"):
            DirLock(tmp_path, ".kenstream.lock").acquire()
        assert _open_fds() == before
