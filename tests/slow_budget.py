"""Slow twin of the tensor and global budgets, written from docs/algorithm.md section 6:
every position's score bin in plain Python and NumPy, then one sort over every tensor in
RAM. Tests compare the engine's kept positions with these."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from tests.slow_rules import M64, mix64, widen


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def score_bins(method, ft, base, name, seed=0):
    """Raw bins [rows, cols] of a tensor given as [rows, cols] arrays."""
    if method == "random":
        salt = zlib.crc32(name.encode())
        rows, cols = ft.shape
        out = np.zeros((rows, cols), np.int64)
        for i in range(rows):
            state = mix64(mix64(mix64(seed & M64) ^ salt) ^ i)
            for j in range(cols):
                out[i, j] = mix64(state ^ j) >> 50
        return out
    x = np.abs(widen(ft)) if method == "magnitude" else np.abs(widen(ft) - widen(base))
    return np.array([[f32_bits(float(v)) >> 17 for v in row] for row in x], np.int64)


def shift(bins, method) -> int:
    """raw_bin(rms) - raw_bin(1.0), the rms over the middles of the positions' bins."""
    if method == "random" or not (bins > 0).any():
        return 0
    mids = [0.0 if b == 0 else bits_f32((int(b) << 17) | (1 << 16)) for b in bins.ravel()]
    rms = math.sqrt(sum(m * m for m in mids) / len(mids))
    return (f32_bits(rms) >> 17) - (127 << 6)


def normalised(bins, s) -> np.ndarray:
    return np.where(bins == 0, 0, bins - s + 8256)


def slow_budget(tensors, method, budget, targets, seed=0) -> dict:
    """name -> bool mask [rows, cols]. ``tensors``: [(name, ft [rows, cols], base)] in
    plan order; ``targets``: name -> values to keep. Ranks by normalised bin, ties by
    (tensor order, row-major position)."""
    keys = []
    for t, (name, ft, base) in enumerate(tensors):
        bins = score_bins(method, ft, base, name, seed)
        nb = normalised(bins, shift(bins, method))
        for p, v in enumerate(nb.ravel()):
            keys.append((-int(v), t, p))
    masks = {name: np.zeros(ft.size, bool) for name, ft, _ in tensors}
    names = [name for name, _, _ in tensors]
    if budget == "global":
        chosen = sorted(keys)[:sum(targets.values())]
    else:
        chosen = []
        for t, name in enumerate(names):
            chosen += sorted(k for k in keys if k[1] == t)[:targets[name]]
    for _, t, p in chosen:
        masks[names[t]][p] = True
    return {name: masks[name].reshape(ft.shape) for name, ft, _ in tensors}
