"""Companion files left behind are named in a warning, each for its own reason, and a copy
that fails leaves no temporary file behind (kenstream.io.extras)."""

from __future__ import annotations

import os

import pytest

from kenstream.errors import OutputError
from kenstream.format.spec import TEMP_SUFFIX
from kenstream.io import extras
from kenstream.io.extras import copy_files
from tests.io.test_extras import _found, _modules, _write


def test_a_modules_list_too_large_to_be_one_copies_no_module_folder(tmp_path):
    m = tmp_path / "m"
    listing = _modules("1_Pooling")
    _write(m, {"modules.json": listing + " " * ((1 << 20) + 1 - len(listing)),
               "1_Pooling/config.json": "{}"})
    names, said = _found(m)
    assert names == ["modules.json"]
    assert any(f"is {(1 << 20) + 1} bytes" in s and "no module folder is copied" in s
               for s in said), said


def test_a_module_path_that_is_a_file_is_named(tmp_path):
    m = tmp_path / "m"
    _write(m, {"modules.json": _modules("1_File"), "1_File": "not a folder"})
    names, said = _found(m)
    assert names == ["modules.json"]
    assert any("1_File: named in modules.json but not a folder" in s for s in said), said


def test_a_module_folder_is_walked_four_levels_deep_and_the_rest_is_named(tmp_path):
    m = tmp_path / "m"
    _write(m, {"modules.json": _modules("1_M"), "1_M/a/b/c/kept.json": "{}",
               "1_M/a/b/c/d/deep.json": "{}"})
    names, said = _found(m)
    assert names == ["1_M/a/b/c/kept.json", "modules.json"]
    assert any(s.startswith(str(m / "1_M/a/b/c/d")) and "nested too deep" in s
               for s in said), said


def test_companions_that_are_no_regular_file_are_named(tmp_path):
    """A dangling link and a FIFO under companion names: skipped (a FIFO is never
    opened), each named with its reason."""
    m = tmp_path / "m"
    _write(m, {"config.json": "{}"})
    os.symlink(tmp_path / "nowhere", m / "tokenizer.json")
    os.mkfifo(m / "vocab.txt")
    names, said = _found(m)
    assert names == ["config.json"]
    assert any("tokenizer.json: a link that leads nowhere" in s for s in said), said
    assert any("vocab.txt: not a regular file" in s for s in said), said


def test_a_companion_too_large_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(extras, "MAX_EXTRA_BYTES", 10)
    m = tmp_path / "m"
    _write(m, {"config.json": "{}", "tokenizer.json": "x" * 11})
    names, said = _found(m)
    assert names == ["config.json"]
    assert any("tokenizer.json: 11 bytes, too large" in s for s in said), said


def test_a_copy_that_cannot_be_put_in_place_leaves_no_temporary_file(tmp_path):
    """The destination name is held by a folder: the copy fails with OutputError, and
    its temporary file is removed."""
    m, out = tmp_path / "m", tmp_path / "out"
    _write(m, {"config.json": "{}"})
    _write(out, {"config.json/inside.txt": "a folder stands at the name"})
    with pytest.raises(OutputError, match="config.json"):
        copy_files(m, ["config.json"], out)
    assert sorted(os.listdir(out)) == ["config.json"]
    assert not (out / ("config.json" + TEMP_SUFFIX)).exists()
