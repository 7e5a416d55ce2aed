"""Files beside the weights: which travel (top-level companions, sentence-transformers module
folders), which are named and left behind, and copies that never write outside the output."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from kenstream.errors import OutputError
from kenstream.io.extras import copy_files, extra_files
from kenstream.io.outputs import remove_listed


def _write(root, files: dict) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _modules(*paths) -> str:
    return json.dumps([{"idx": i, "name": str(i), "path": p, "type": "m"}
                       for i, p in enumerate(paths)])


def _found(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = extra_files(folder)
    return names, [str(w.message) for w in caught]


def test_module_folders_travel_and_other_subfolders_are_named(tmp_path):
    """A sentence-transformers folder: the modules.json folders go whole (the Dense
    module's weights too, and a nested folder), the sentencepiece vocabulary goes, an ONNX
    export and tool state stay (a hidden broken link in a module folder is not even
    looked at), and one warning names what was left."""
    m = tmp_path / "m"
    _write(m, {"model.safetensors": b"w", "config.json": "{}", "spiece.model": b"sp",
               "modules.json": _modules("", "1_Pooling", "2_Dense", "3_Normalize"),
               "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
               "2_Dense/config.json": "{}", "2_Dense/model.safetensors": b"\x01" * 300,
               "2_Dense/inner/extra.bin": b"x", "2_Dense/.hidden": b"h",
               "3_Normalize/README.md": "n",
               "onnx/model.onnx": b"o", "onnx/config.json": "{}",
               ".cache/huggingface/download/x.json": "{}"})
    os.symlink(tmp_path / "nowhere", m / "2_Dense" / ".lock")  # hidden: passed over unread
    names, said = _found(m)
    assert names == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/inner/extra.bin",
                     "2_Dense/model.safetensors", "3_Normalize/README.md", "config.json",
                     "modules.json", "spiece.model"]
    assert len(said) == 1 and "onnx/" in said[0] and ".cache" not in said[0]


def test_every_tokenizer_vocabulary_travels_and_weights_do_not(tmp_path):
    """The vocabulary files transformers' tokenizers load, by the names they use; none of
    the weight and training files beside them."""
    vocabularies = ["added_tokens.json", "bpe.codes", "merges.txt", "qwen.tiktoken",
                    "sentencepiece.bpe.model", "source.spm", "special_tokens_map.json",
                    "spiece.model", "spm.model", "target.spm", "tekken.json", "tokenizer.json",
                    "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json",
                    "vocab.json", "vocab.txt"]
    others = ["model.safetensors", "pytorch_model.bin", "model.onnx", "optimizer.pt",
              "training_args.bin", "rng_state.pth", "model.safetensors.index.json"]
    m = tmp_path / "m"
    _write(m, {name: "v" for name in vocabularies + others})
    names, said = _found(m)
    assert names == sorted(vocabularies) and said == []


@pytest.mark.parametrize("listing", [
    '{"not": "a list"}', "[1, 2]", "not json",
])
def test_a_damaged_modules_list_copies_no_module_folder_and_says_so(tmp_path, listing):
    m = tmp_path / "m"
    _write(m, {"modules.json": listing, "config.json": "{}", "1_Pooling/config.json": "{}"})
    names, said = _found(m)
    assert names == ["config.json", "modules.json"]
    assert any("modules.json" in s and "no module folder" in s for s in said), said


def test_module_paths_that_leave_the_folder_are_refused(tmp_path):
    """A path with '..', an absolute path, a folder that is a link out of the model, and a
    file that is a link out of it: none is copied, each is named."""
    outside = tmp_path / "outside"
    _write(outside, {"secret.json": "s", "sub/key.txt": "k"})
    m = tmp_path / "m"
    _write(m, {"modules.json": _modules("../outside", str(outside), "1_Link", "2_Ok",
                                        "3_Missing"),
               "2_Ok/config.json": "{}"})
    os.symlink(outside / "sub", m / "1_Link")
    os.symlink(outside / "secret.json", m / "2_Ok" / "leak.json")
    names, said = _found(m)
    assert names == ["2_Ok/config.json", "modules.json"]
    text = "\n".join(said)
    for named in ("'../outside'", repr(str(outside)), "1_Link", "leak.json", "3_Missing"):
        assert named in text, named


def test_copies_make_subfolders_and_never_write_through_a_link(tmp_path):
    src = tmp_path / "src"
    _write(src, {"1_Pooling/config.json": "pool", "top.json": "top"})
    out = tmp_path / "out"
    out.mkdir()
    copy_files(src, ["1_Pooling/config.json", "top.json"], out)
    assert (out / "1_Pooling" / "config.json").read_text() == "pool"
    assert (out / "top.json").read_text() == "top"
    assert sorted(p.name for p in (out / "1_Pooling").iterdir()) == ["config.json"]

    elsewhere, planted = tmp_path / "elsewhere", tmp_path / "planted"
    elsewhere.mkdir()
    planted.mkdir()
    os.symlink(elsewhere, planted / "1_Pooling")
    with pytest.raises(OutputError) as err:
        copy_files(src, ["1_Pooling/config.json"], planted)
    assert "1_Pooling/config.json" in str(err.value)
    assert list(elsewhere.iterdir()) == []


def test_removing_listed_files_removes_the_folders_they_emptied(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a/b/c.json": "c", "a/d.json": "d", "kept/x.json": "x", "kept/mine.txt": "m",
                 "top.json": "t"})
    remove_listed(out, ["a/b/c.json", "a/d.json", "kept/x.json", "top.json"])
    assert sorted(p.name for p in out.iterdir()) == ["kept"]
    assert [p.name for p in (out / "kept").iterdir()] == ["mine.txt"]


def test_a_companion_of_exactly_the_limit_travels(tmp_path, monkeypatch):
    """MAX_EXTRA_BYTES is the largest companion copied (lowered here to 10): 10 bytes
    travel, 11 are named in a warning and stay."""
    from kenstream.io import extras

    monkeypatch.setattr(extras, "MAX_EXTRA_BYTES", 10)
    _write(tmp_path, {"a.json": "x" * 10, "b.json": "y" * 11})
    names, said = _found(tmp_path)
    assert names == ["a.json"]
    assert said == [f"{tmp_path / 'b.json'}: 11 bytes, too large for a file beside the "
                    "weights; not copied"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_copying_and_checking_companions_leaves_no_descriptor_open(tmp_path):
    """copy_files and stale_copies open a folder descriptor per file (to write and read
    inside ``out`` without following links) and close each: a model of many companions
    must not run the process out of descriptors."""
    from kenstream.io.extras import stale_copies

    src, out = tmp_path / "src", tmp_path / "out"
    names = [f"sub/f{i}.json" for i in range(20)]
    _write(src, {n: n for n in names})
    out.mkdir()
    before = _open_fds()
    copy_files(src, names, out)
    assert _open_fds() == before
    assert stale_copies(src, names, out) == []
    assert _open_fds() == before


def test_a_copy_that_differs_past_the_first_mebibyte_is_stale(tmp_path):
    """The byte comparison reads every chunk: two 3 MiB files alike but for their last
    byte differ."""
    from kenstream.io.extras import stale_copies

    src, out = tmp_path / "src", tmp_path / "out"
    data = bytes(3 << 20)
    _write(src, {"big.json": data})
    _write(out, {"big.json": data[:-1] + b"\x01"})
    assert stale_copies(src, ["big.json"], out) == ["big.json"]
    _write(out, {"big.json": data})
    assert stale_copies(src, ["big.json"], out) == []


def test_a_missing_module_folder_and_a_pipe_are_named_and_not_copied(tmp_path):
    """A module folder that modules.json names but the folder lacks, and an entry that is
    neither a file nor a folder (a FIFO, which a copy would block on), are each named in a
    warning that says why, and left out."""
    _write(tmp_path, {"modules.json": _modules("1_Pooling", "2_Dense"),
                      "1_Pooling/config.json": "{}"})
    os.mkfifo(tmp_path / "1_Pooling" / "pipe.json")
    names, said = _found(tmp_path)
    assert names == ["1_Pooling/config.json", "modules.json"]
    assert said == [f"{tmp_path / '1_Pooling' / 'pipe.json'}: not a regular file; not copied",
                    f"{tmp_path / '2_Dense'}: named in modules.json but missing; not copied"]
