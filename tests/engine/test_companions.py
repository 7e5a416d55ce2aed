"""The companion files a diff carries (config, tokenizer, the fine-tune's card) are listed
in its index with their sizes and sha256 (docs/format.md 6.2): one lost or damaged in
transit stops rebuild and verify, naming it, instead of a model that loads wrongly or
not at all; a file added to the diff folder later is not copied into a rebuilt model."""

from __future__ import annotations

import hashlib
import json

import torch

from kenstream.cli import main
from tests.ckpt import save_dir
from tests.test_reliability import assert_not_complete, assert_one_error

COMPANIONS = {"config.json": '{"model_type": "toy"}', "tokenizer.json": '{"version": "1.0"}',
              "README.md": "# the fine-tune's card\n"}


def pair(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(4, 8, generator=g)}
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", {"w": base["w"] + 0.01})
    for name, text in COMPANIONS.items():
        (f / name).write_text(text)
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "1", "-q"]) == 0
    return b, f, d


def test_the_index_lists_each_companion_with_its_size_and_hash(tmp_path):
    b, f, d = pair(tmp_path)
    files = json.loads((d / "kenstream-diff.json").read_text())["files"]
    want = {("README.finetuned.md" if n == "README.md" else n): t.encode()
            for n, t in COMPANIONS.items()}
    assert files == {n: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
                     for n, raw in want.items()}


def test_a_companion_lost_or_edited_in_transit_is_named(tmp_path, capsys):
    b, f, d = pair(tmp_path)
    (d / "config.json").unlink()
    (d / "tokenizer.json").write_text('{"version": "2.0"}')
    capsys.readouterr()
    for argv, name, what in (
            (["rebuild", str(b), str(d), "-o", str(tmp_path / "out")], "config.json",
             "listed in the diff's index but missing"),
            (["verify", str(b), str(d)], "config.json", "listed in the diff's index")):
        assert main([*argv, "-q"]) == 2
        assert_one_error(capsys.readouterr().err, str(d / name), what, "copy the whole diff")
    assert not (tmp_path / "out").exists()
    (d / "config.json").write_text(COMPANIONS["config.json"])
    assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert_one_error(capsys.readouterr().err, str(d / "tokenizer.json"), "differs from the file")
    assert_not_complete(tmp_path / "out")


def test_only_the_listed_companions_are_copied(tmp_path):
    b, f, d = pair(tmp_path)
    (d / "special_tokens_map.json").write_text("{}")  # added after the diff was made
    assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / "out"), "-q"]) == 0
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == COMPANIONS["config.json"]
    assert (out / "tokenizer.json").read_text() == COMPANIONS["tokenizer.json"]
    assert not (out / "special_tokens_map.json").exists()


def test_a_diff_that_lists_no_files_takes_the_folders_companions(tmp_path):
    """Diffs written before the list: rebuild copies what the folder holds, as it did."""
    b, f, d = pair(tmp_path)
    index = json.loads((d / "kenstream-diff.json").read_text())
    del index["files"]
    (d / "kenstream-diff.json").write_text(json.dumps(index))
    (d / "special_tokens_map.json").write_text("{}")
    assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "special_tokens_map.json").read_text() == "{}"
    assert (tmp_path / "out" / "config.json").read_text() == COMPANIONS["config.json"]


def test_a_listed_name_that_leaves_the_diff_is_refused(tmp_path, capsys):
    b, f, d = pair(tmp_path)
    index = json.loads((d / "kenstream-diff.json").read_text())
    for name in ("../ft/config.json", "/etc/passwd", "a//b", "./config.json"):
        index["files"] = {name: {"size": 1, "sha256": "0" * 64}}
        (d / "kenstream-diff.json").write_text(json.dumps(index))
        assert main(["info", str(d)]) == 2
        assert_one_error(capsys.readouterr().err, "is not a relative path inside the diff")
