"""kenstream.io.safefs and the output claim facing what others left on disk: a file that
cannot be opened, a file longer than it says, a lock file that is no lock file, a marker
that is no file; and a resumed run's new files added to the marker."""

from __future__ import annotations

import json
import os

import pytest

from kenstream.errors import CheckpointError, OutputError
from kenstream.io.outputs import LOCK_NAME, MARKER_NAME, Claim, claim_output
from kenstream.io.safefs import DirLock, open_regular, read_regular


def test_a_file_that_cannot_be_opened_is_refused_by_name(tmp_path):
    loop = tmp_path / "loop.json"
    os.symlink(loop.name, loop)  # a link to itself: open fails with ELOOP
    with pytest.raises(CheckpointError, match="config cannot be opened") as caught:
        open_regular(loop, what="config")
    assert str(loop) in str(caught.value)


def test_a_file_longer_than_its_size_says_is_cut_at_the_limit(tmp_path):
    """/proc files report size 0 and hold more: the read stops one byte past the limit
    and is refused, whatever the size said."""
    with pytest.raises(CheckpointError, match="grew past 16 bytes"):
        read_regular("/proc/self/maps", 16, error=CheckpointError, what="maps")
    small = tmp_path / "small.json"
    small.write_text("x" * 16)
    assert read_regular(small, 16, error=CheckpointError, what="small") == b"x" * 16
    small.write_text("x" * 17)
    with pytest.raises(CheckpointError, match="is 17 bytes, more than any real one"):
        read_regular(small, 16, error=CheckpointError, what="small")


@pytest.mark.parametrize("kind, message", [
    ("link", "the lock file is a symbolic link"),
    ("folder", "lock"),
    ("fifo", "the lock file is not a regular file"),
])
def test_a_lock_file_that_is_no_lock_file_is_refused(tmp_path, kind, message):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    if kind == "link":
        os.symlink(tmp_path / "elsewhere", lock)
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with pytest.raises(OutputError, match=message):
        DirLock(out, LOCK_NAME).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_a_marker_that_is_no_file_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / MARKER_NAME).mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(OutputError, match="marker .kenstream-output is not a regular file"):
        with claim_output(out, inputs=[], resume=False, overwrite=True, plan="p.json",
                          index="i.json", files=["model.safetensors"]):
            pass
    assert (out / "model.safetensors").exists()


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        with claim_output(out, inputs=[], resume=False, overwrite=True, plan="p.json",
                          index="i.json", files=["model.safetensors"]):
            pass
    assert out.read_text() == "mine"


def test_a_resumed_run_adds_its_new_files_to_the_marker(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, inputs=[], resume=False, overwrite=False, plan="p.json",
                      index="i.json", files=["a.json", "p.json"]) as claim:
        assert claim.state == "fresh"
    claim = Claim(out, "resume", ["a.json", "p.json"])
    claim.record(["b.json", "a.json"])
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["files"] == ["a.json", "b.json", "p.json"]
    assert claim.files == ["a.json", "b.json", "p.json"]
