"""Independent expectations for end-to-end tests: the model that base + diff must rebuild.

Computed from the slow twins of the selection rules (``tests/slow_ken.py`` and
``tests/slow_rules.py``), row by row, with torch doing the composition: never with the
code under test.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch
from safetensors.torch import load_file

from kenstream.settings import DEFAULT_TIES
from tests import slow_ken, slow_rules


def bits(t: torch.Tensor) -> np.ndarray:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width).numpy()


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols]: the first axis by the rest; a 1-D tensor is one row."""
    rows = t.shape[0] if t.dim() >= 2 else 1
    return t.reshape(rows, t.numel() // rows if rows else int(np.prod(t.shape[1:])))


def as_f32(t: torch.Tensor) -> np.ndarray:
    """Rows as the float32 values the rules see (float64 rounded to nearest)."""
    return t.to(torch.float32).numpy()


def slow_mask(method, ft2: torch.Tensor, base2: torch.Tensor, k: int, ties=DEFAULT_TIES,
              seed=0, name="") -> np.ndarray:
    """Keep-mask of ``ft2`` [rows, cols] by the slow twin of ``method``; the random rule and
    scrambled ties draw from (seed, crc32 of the tensor name, row)."""
    x = as_f32(ft2)
    salt = zlib.crc32(name.encode("utf-8"))
    if method == "ken":
        return np.stack([slow_ken.ken_mask(row, k, ties, seed=seed, salt=salt, row_number=r)
                         for r, row in enumerate(x)]) if len(x) else np.zeros(x.shape, bool)
    if method == "delta":
        return slow_rules.slow_delta(x, as_f32(base2), k, ties, seed=seed, salt=salt)
    if method == "magnitude":
        return slow_rules.slow_magnitude(x, k, ties, seed=seed, salt=salt)
    return np.stack([slow_rules.slow_random_row(seed, salt, r, x.shape[1], k)
                     for r in range(x.shape[0])])


def expected_model(base: dict, ft: dict, prefix: str = "", *, keep=None, k=None,
                   ties=DEFAULT_TIES, method="ken", seed=0, selected=lambda name: True) -> dict:
    """Every fine-tune tensor as base + diff must rebuild it: aligned float tensors of equal
    shape are selected row by row (the rest stay the fine-tune's own), and reset positions
    take the base value converted to the fine-tune's dtype."""
    out = {}
    for name, t in ft.items():
        bname = name[len(prefix):] if prefix and name.startswith(prefix) else name
        b = base.get(bname)
        if b is None or b.shape != t.shape or not t.is_floating_point() \
                or not b.is_floating_point() or not selected(name):
            out[name] = t.clone()
            continue
        ft2, base2 = rows_of(t), rows_of(b.to(t.dtype))
        cols = ft2.shape[1]
        kk = k if k is not None else max(1, int(round(keep * cols)))
        mask = torch.from_numpy(slow_mask(method, ft2, base2, kk, ties, seed, name))
        res = torch.where(mask, ft2, base2)
        out[name] = res.reshape(t.shape)
    return out


def load_model_dir(directory) -> dict:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    got = {}
    for fname in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(directory / fname)))
    return got


def assert_same_model(directory, expected: dict) -> None:
    """The rebuilt model folder holds exactly ``expected``, bit for bit, with a correct index."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    got = load_model_dir(directory)
    assert sorted(got) == sorted(expected)
    assert set(index["weight_map"]) == set(expected)
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert np.array_equal(bits(got[name]), bits(t)), name
