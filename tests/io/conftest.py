"""Shared builders for the io tests: tiny real checkpoints and hand-made safetensors bytes.

Real files come from the ``safetensors`` and ``torch`` libraries (independent writers);
corrupt files are assembled byte by byte here, following the published layout. Helpers
reach the tests through the ``io_helpers`` fixture rather than imports, so the tests
collect under any pytest import mode.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file


def raw_safetensors(header, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    """File bytes: u64 LE header length, header JSON (or ``header_bytes`` verbatim), data."""
    if header_bytes is None:
        header_bytes = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def tiny_state(seed: int = 0, prefix: str = "layer") -> dict[str, torch.Tensor]:
    """A few tensors of the dtypes real checkpoints use, with random values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}.0.weight": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        f"{prefix}.0.bias": torch.randn(4, generator=gen).to(torch.bfloat16),
        f"{prefix}.1.weight": torch.randn(3, 4, generator=gen),
        f"{prefix}.1.half": torch.randn(2, 5, generator=gen).to(torch.float16),
        f"{prefix}.ids": torch.arange(7, dtype=torch.int64),
    }


def storage_bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's exact bits as an unsigned NumPy array of the same element width."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[tensor.element_size()]
    return tensor.contiguous().view(width).numpy().view(unsigned)


def same_bits(array: np.ndarray, tensor: torch.Tensor) -> bool:
    """Whether ``array`` (kenstream storage dtype) holds exactly ``tensor``'s bits and shape."""
    if tuple(array.shape) != tuple(tensor.shape) or array.itemsize != tensor.element_size():
        return False
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize]
    return np.array_equal(np.array(array, order="C").view(unsigned), storage_bits(tensor))


@pytest.fixture
def write_model(tmp_path):
    """``write_model(dir, state, shards=1, fmt="safetensors"|"bin")`` -> the folder.

    Writes ``model.safetensors`` / ``pytorch_model.bin``, or HF-style shards plus index.
    """

    def write(folder, state, *, shards: int = 1, fmt: str = "safetensors"):
        folder.mkdir(parents=True, exist_ok=True)
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        names = list(state)

        def save(part, path):
            if fmt == "safetensors":
                torch_save_file(part, str(path))
            else:
                torch.save(part, path)

        if shards == 1:
            save(state, folder / f"{stem}.{ext}")
            return folder
        weight_map = {}
        for i in range(shards):
            part_names = names[i::shards]
            shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
            save({n: state[n] for n in part_names}, folder / shard)
            weight_map.update({n: shard for n in part_names})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
        return folder

    return write


@pytest.fixture
def io_helpers():
    """The plain helper functions above, for tests to call."""
    return SimpleNamespace(raw_safetensors=raw_safetensors, tiny_state=tiny_state,
                           storage_bits=storage_bits, same_bits=same_bits)
