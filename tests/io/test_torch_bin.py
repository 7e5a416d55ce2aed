"""TorchBinFile against files written by torch.save, and damaged or unsafe pickles."""

from __future__ import annotations

import argparse
import pickle
import warnings

import numpy as np
import pytest
import torch

from kenstream.errors import CheckpointError, CorruptFileError, UnsafeCheckpointError
from kenstream.io.torch_bin import TorchBinFile


def _state():
    gen = torch.Generator().manual_seed(11)
    tied = torch.randn(5, 3, generator=gen)
    return {
        "emb.weight": tied,
        "head.weight": tied,  # tied weights share one storage in the pickle
        "bf": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        "half": torch.randn(3, generator=gen).to(torch.float16),
        "e4": (torch.randn(5, generator=gen) * 20).to(torch.float8_e4m3fn),
        "transposed": torch.randn(3, 4, generator=gen).t(),  # saved as a strided view
        "mask": torch.tensor([True, False, True]),
        "count": torch.tensor(7, dtype=torch.int64),
        "u16": torch.tensor([1, 65535, 3], dtype=torch.int32).to(torch.uint16),
    }


def test_zip_checkpoint_reads_back_bit_for_bit(tmp_path, io_helpers):
    state = _state()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with TorchBinFile(path) as f:
        assert f.names() == list(state)
        codes = {n: f.info(n).dtype for n in f.names()}
        assert codes == {"emb.weight": "F32", "head.weight": "F32", "bf": "BF16", "half": "F16",
                         "e4": "F8_E4M3", "transposed": "F32", "mask": "BOOL", "count": "I64",
                         "u16": "U16"}
        for name, tensor in state.items():
            arr = f.array(name)
            info = f.info(name)
            assert io_helpers.same_bits(arr, tensor), name
            assert arr.flags.c_contiguous and not arr.flags.writeable
            assert info.shape == tuple(tensor.shape) and info.file == path
            assert info.nbytes == tensor.numel() * tensor.element_size()
        assert f.array("bf").dtype == np.uint16 and f.array("mask").dtype == np.bool_
        with pytest.raises(ValueError):
            f.array("emb.weight")[0, 0] = 0.0


def test_legacy_pickle_format_reads(tmp_path, io_helpers):
    state = {"w": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int32)}
    path = tmp_path / "legacy.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with TorchBinFile(path) as f:
        assert f.names() == ["w", "b"]
        assert all(io_helpers.same_bits(f.array(n), state[n]) for n in state)


def test_non_tensor_entries_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.ones(2), "step": 5, "note": "x"}, path)
    with pytest.warns(UserWarning, match="skipped 2 non-tensor entries"):
        f = TorchBinFile(path)
    assert f.names() == ["w"]


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace") as caught:
        TorchBinFile(path)
    assert caught.value.file == str(path) and str(path) in str(caught.value)


def test_plain_pickles(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(pickle.dumps(argparse.Namespace(a=1), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        TorchBinFile(path)
    path.write_bytes(pickle.dumps({"w": 1}, protocol=2))  # a pickle, but not torch's format
    with pytest.raises(CorruptFileError):
        TorchBinFile(path)


@pytest.mark.parametrize("make", [
    lambda good: b"",
    lambda good: b"this is not a checkpoint at all" * 4,
    lambda good: good[: len(good) // 2],
    lambda good: good[:-30],
    lambda good: b"\x80\x02" + b"\x00" * 40,
], ids=["empty", "text", "truncated-zip", "tail-cut-zip", "broken-pickle"])
def test_damaged_files_are_corrupt(tmp_path, make):
    good_path = tmp_path / "good.bin"
    torch.save({"w": torch.randn(64)}, good_path)
    path = tmp_path / "bad.bin"
    path.write_bytes(make(good_path.read_bytes()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptFileError) as caught:
            TorchBinFile(path)
    assert caught.value.file == str(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.bin"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        TorchBinFile(path)
    path = tmp_path / "nested.bin"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no tensors"):
        TorchBinFile(path)
    with pytest.raises(CheckpointError, match="not found"):
        TorchBinFile(tmp_path / "absent.bin")


def test_unsupported_dtype_names_the_tensor(tmp_path):
    path = tmp_path / "c.bin"
    torch.save({"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(CheckpointError, match="complex64") as caught:
        TorchBinFile(path)
    assert caught.value.tensor == "z" and caught.value.file == str(path)


def test_closed_file_refuses_arrays_but_views_survive(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    f = TorchBinFile(path)
    arr = f.array("w")
    f.close()
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(CheckpointError, match="closed"):
        f.array("w")
