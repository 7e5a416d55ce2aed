"""kenstream.io.outputs: an output that cannot be created, and a folder that changes
between the first look and the lock."""

from __future__ import annotations

import pytest

from kenstream.errors import OutputError
from kenstream.io import outputs
from tests.test_reliability import assert_one_error, cli, compress_argv, pair  # noqa: F401


def test_an_output_that_cannot_be_created_is_one_error_line(pair, capsys):
    b, f, out = pair
    blocker = out.parent / "a-file"
    blocker.write_text("not a folder")
    code, err = cli(capsys, compress_argv(b, f, blocker / "out"), [b, f])
    assert code == 2
    assert_one_error(err, "cannot create", "a-file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("resume, overwrite", [(False, True), (True, False)])
def test_a_folder_filled_by_someone_else_before_the_lock_is_refused(tmp_path, monkeypatch,
                                                                   resume, overwrite):
    """The folder is surveyed again once locked: files another program put there after the
    first look make it someone else's folder, refused as such, and left as they are."""
    out = tmp_path / "out"
    acquire = outputs.DirLock.acquire

    def meanwhile(self):
        (self.folder / "theirs.txt").write_text("theirs")
        return acquire(self)

    monkeypatch.setattr(outputs.DirLock, "acquire", meanwhile)
    with pytest.raises(OutputError) as caught:
        with outputs.claim_output(out, inputs=[], resume=resume, overwrite=overwrite,
                                  plan="plan.json", index="index.json", files=["a.kdiff"]):
            pass
    message = str(caught.value)
    assert ("nothing to resume here" if resume else "kenstream replaces only its own") in message
    assert (out / "theirs.txt").read_text() == "theirs"
    assert not (out / outputs.MARKER_NAME).exists()


def _marked(tmp_path, listed, present):
    out = tmp_path / "out"
    out.mkdir()
    outputs.write_marker(out, listed)
    for name in present:
        (out / name).write_text(name)
    return out


def test_a_resume_refuses_a_foreign_file_at_a_temporary_name_it_would_write(tmp_path):
    """A resumed run that writes a file the first did not refuses a folder holding a file
    at that file's temporary name, which kenstream did not write and would replace."""
    from kenstream.format.spec import TEMP_SUFFIX

    theirs = "b.kdiff" + TEMP_SUFFIX
    out = _marked(tmp_path, ["plan.json", "a.kdiff"], ["plan.json", "a.kdiff", theirs])
    with pytest.raises(OutputError, match="holds b.kdiff, which this run would replace"):
        with outputs.claim_output(out, inputs=[], resume=True, overwrite=False,
                                  plan="plan.json", index="index.json",
                                  files=["plan.json", "a.kdiff", "b.kdiff"]):
            pass
    assert (out / theirs).read_text() == theirs


def test_a_resume_of_a_run_with_neither_plan_nor_index_says_there_is_nothing(tmp_path):
    out = _marked(tmp_path, ["plan.json", "a.kdiff"], ["a.kdiff"])
    with pytest.raises(OutputError, match="nothing to resume here") as caught:
        with outputs.claim_output(out, inputs=[], resume=True, overwrite=False,
                                  plan="plan.json", index="index.json",
                                  files=["plan.json", "a.kdiff"]):
            pass
    assert "--overwrite" in str(caught.value)
    assert (out / "a.kdiff").read_text() == "a.kdiff"


def test_a_listed_file_that_cannot_be_deleted_is_named(tmp_path, monkeypatch):
    out = _marked(tmp_path, ["a.kdiff"], ["a.kdiff"])

    def refused(folder, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs, "_unlink_inside", refused)
    with pytest.raises(OutputError, match="cannot delete: Permission denied") as caught:
        outputs.remove_listed(out, ["a.kdiff"])
    assert "a.kdiff" in str(caught.value)


def test_removing_listed_files_closes_every_folder_it_entered(tmp_path):
    import os

    out = _marked(tmp_path, [], [])
    (out / "sub").mkdir()
    for name in ("a.kdiff", "sub/b.json"):
        (out / name).write_text(name)
    before = set(os.listdir("/proc/self/fd"))
    outputs.remove_listed(out, ["a.kdiff", "sub/b.json"])
    assert set(os.listdir("/proc/self/fd")) == before
    assert not (out / "a.kdiff").exists() and not (out / "sub").exists()
