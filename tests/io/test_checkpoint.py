"""Checkpoint.open over folders, single files, shard indexes; identity and fingerprints."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

from kenstream.errors import CheckpointError, CorruptFileError, SourceNotFoundError
from kenstream.io import Checkpoint, fingerprint, sha256_file
from tests.test_reliability import assert_one_error, cli


def _check_all(ckpt, state, same_bits):
    assert sorted(ckpt.names()) == sorted(state)
    for name, tensor in state.items():
        arr = ckpt.array(name)
        assert same_bits(arr, tensor), name
        assert not arr.flags.writeable
        assert ckpt.info(name).shape == tuple(tensor.shape)


def test_single_safetensors_folder(tmp_path, write_model, io_helpers):
    state = io_helpers.tiny_state()
    root = write_model(tmp_path / "m", state)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "vocab.txt", "README.md", "training_args.bin"):
        (root / name).write_text("{}")
    with Checkpoint.open(root) as ckpt:
        _check_all(ckpt, state, io_helpers.same_bits)
        assert ckpt.files == [root / "model.safetensors"] and ckpt.root == root
        assert ckpt.extra_files() == [  # weights and their kin stay behind
            "README.md", "chat_template.jinja", "config.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.txt"]
        ident = ckpt.identity()
    assert ident["kind"] == "local" and ident["source"] == str(root)
    assert ident["repo_id"] is None and ident["revision"] is None
    assert ident["files"] == {"model.safetensors": fingerprint(root / "model.safetensors")}
    json.dumps(ident)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_folder_with_index(tmp_path, write_model, io_helpers, fmt):
    state = {**io_helpers.tiny_state(0, "a"), **io_helpers.tiny_state(1, "b")}
    root = write_model(tmp_path / "m", state, shards=3, fmt=fmt)
    with Checkpoint.open(str(root)) as ckpt:
        _check_all(ckpt, state, io_helpers.same_bits)
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        assert [p.name for p in ckpt.files] == [f"{stem}-0000{i}-of-00003.{fmt}" for i in (1, 2, 3)]
        # Order: shard by shard, each shard's own tensors grouped together.
        shard_of = [ckpt.info(n).file.name for n in ckpt.names()]
        assert shard_of == sorted(shard_of)
        assert ckpt.index_file == root / f"{stem}.{fmt}.index.json"
        assert set(ckpt.identity()["files"]) == {p.name for p in ckpt.files}
    # The index file itself is also an accepted reference.
    with Checkpoint.open(root / f"{stem}.{fmt}.index.json") as ckpt:
        assert len(ckpt) == len(state)


def test_single_files_and_preference(tmp_path, write_model, io_helpers):
    st_state = io_helpers.tiny_state(0)
    bin_state = io_helpers.tiny_state(5)
    root = write_model(tmp_path / "both", st_state)
    write_model(root, bin_state, fmt="bin")
    with Checkpoint.open(root) as ckpt:  # safetensors preferred over .bin
        assert ckpt.files == [root / "model.safetensors"]
        _check_all(ckpt, st_state, io_helpers.same_bits)
    with Checkpoint.open(root / "pytorch_model.bin") as ckpt:
        _check_all(ckpt, bin_state, io_helpers.same_bits)
    with Checkpoint.open(root / "model.safetensors") as ckpt:
        assert ckpt.root == root and ckpt.kind == "local"
    bin_only = write_model(tmp_path / "binonly", bin_state, fmt="bin")
    with Checkpoint.open(bin_only) as ckpt:
        _check_all(ckpt, bin_state, io_helpers.same_bits)


def test_nothing_found_and_ambiguity(tmp_path, write_model, io_helpers):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(SourceNotFoundError, match="model.safetensors") as caught:
        Checkpoint.open(empty)
    assert caught.value.file == str(empty)
    with pytest.raises(SourceNotFoundError):
        Checkpoint.open(tmp_path / "nope" / "x.safetensors")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        torch_save_file({"w": torch.ones(2)}, str(two / name))
    with pytest.raises(CheckpointError, match="several"):
        Checkpoint.open(two)
    (two / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a .safetensors"):
        Checkpoint.open(two / "notes.txt")


def _sharded(tmp_path, write_model, io_helpers):
    state = {**io_helpers.tiny_state(0, "a"), **io_helpers.tiny_state(1, "b")}
    root = write_model(tmp_path / "m", state, shards=2)
    index_path = root / "model.safetensors.index.json"
    return root, index_path, json.loads(index_path.read_text())


def _expect_index_error(index_path, fragment, tensor=None):
    with pytest.raises(CorruptFileError) as caught:
        Checkpoint.open(index_path.parent)
    err = caught.value
    assert err.file == str(index_path) and fragment in str(err)
    if tensor is not None:
        assert err.tensor == tensor and repr(tensor) in str(err)


def test_index_missing_shard(tmp_path, write_model, io_helpers):
    root, index_path, _ = _sharded(tmp_path, write_model, io_helpers)
    (root / "model-00002-of-00002.safetensors").unlink()
    _expect_index_error(index_path, "'model-00002-of-00002.safetensors', which is missing")


def test_shards_without_their_index_name_the_index(tmp_path, write_model, io_helpers,
                                                   capsys):
    """Shards found without their index were 'several *.safetensors files ...; pass the one
    to use', and a lone shard was taken for the whole model: the missing index is named,
    and that every shard is needed."""
    root, index_path, _ = _sharded(tmp_path, write_model, io_helpers)
    index_path.unlink()
    bins = tmp_path / "bins"
    bins.mkdir()
    for i in (1, 2):
        torch.save({f"w{i}": torch.ones(2)}, bins / f"pytorch_model-0000{i}-of-00002.bin")
    for folder, index in ((root, "model.safetensors.index.json"),
                          (bins, "pytorch_model.bin.index.json")):
        with pytest.raises(CheckpointError, match=f"{index} is missing: .* are shards of a "
                                                  "model that needs all its shards") as caught:
            Checkpoint.open(folder)
        assert caught.value.file == str(folder)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is a shard of a model"):
        Checkpoint.open(root)
    out = tmp_path / "out"
    code, err = cli(capsys, ["compress", root, root, "-o", out, "--keep", "0.5"], [root])
    assert code == 2 and not out.exists()
    assert_one_error(err, str(root), "model.safetensors.index.json is missing",
                     "copy or download model.safetensors.index.json into this folder")


def test_index_lists_tensor_missing_from_shard(tmp_path, write_model, io_helpers):
    root, index_path, index = _sharded(tmp_path, write_model, io_helpers)
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect_index_error(index_path, "missing from it", tensor="ghost.weight")


def test_index_maps_tensor_to_the_wrong_shard(tmp_path, write_model, io_helpers):
    root, index_path, index = _sharded(tmp_path, write_model, io_helpers)
    name = next(n for n, s in index["weight_map"].items() if s.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect_index_error(index_path, "model-0000", tensor=name)


def test_tensor_in_two_shards(tmp_path, write_model, io_helpers):
    root, index_path, index = _sharded(tmp_path, write_model, io_helpers)
    torch_save_file({"a.0.weight": torch.ones(2), "extra": torch.ones(1)},
                    str(root / "model-00002-of-00002.safetensors"))
    index["weight_map"]["extra"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect_index_error(index_path, "in both shards", tensor="a.0.weight")


def test_shard_tensor_not_in_index(tmp_path, write_model, io_helpers):
    root, index_path, index = _sharded(tmp_path, write_model, io_helpers)
    dropped = next(iter(index["weight_map"]))
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    _expect_index_error(index_path, "not in the weight_map", tensor=dropped)


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"w": 3}}', "weight_map"),
    ('{"weight_map": {"w": "../outside.safetensors"}}', "not a file beside the index"),
    ('{"weight_map": {"w": "/abs/x.safetensors"}}', "not a file beside the index"),
])
def test_malformed_index(tmp_path, text, fragment):
    root = tmp_path / "m"
    root.mkdir()
    index_path = root / "model.safetensors.index.json"
    index_path.write_text(text)
    _expect_index_error(index_path, fragment)


def test_shard_corruption_names_the_shard(tmp_path, write_model, io_helpers):
    root, _, _ = _sharded(tmp_path, write_model, io_helpers)
    shard = root / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CorruptFileError) as caught:
        Checkpoint.open(root)
    assert caught.value.file == str(shard)


# -- fingerprints ----------------------------------------------------------------------

def _slow_fingerprint(data: bytes) -> str:
    # The documented recipe, written out over an in-memory copy of the file.
    size = len(data)
    hashed = size.to_bytes(8, "little")
    if size <= (1 << 20) + 16 * (64 << 10):
        hashed += data
    else:
        hashed += data[: 1 << 20]
        for i in range(16):
            start = i * (size - (64 << 10)) // 15
            hashed += data[start:start + (64 << 10)]
    return "sha256-sampled:" + hashlib.sha256(hashed).hexdigest()


@pytest.mark.parametrize("size", [0, 1000, (2 << 20), (2 << 20) + 1, (5 << 20) + 12345])
def test_fingerprint_matches_recipe(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert fingerprint(path) == _slow_fingerprint(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_fingerprint_sees_header_tail_and_size_changes(tmp_path):
    data = bytearray(np.random.default_rng(1).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes())
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    base = fingerprint(path)
    for mutate in (lambda d: d.__setitem__(10, d[10] ^ 1),
                   lambda d: d.__setitem__(len(d) - 1, d[-1] ^ 1),
                   lambda d: d.extend(b"\0")):
        changed = bytearray(data)
        mutate(changed)
        path.write_bytes(changed)
        assert fingerprint(path) != base
