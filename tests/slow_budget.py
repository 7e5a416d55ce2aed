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


def spread(quota, count) -> list:
    """Which of ``count`` equal positions an even spread of ``quota`` takes: the j-th when
    floor((j + 1) quota / count) > floor(j quota / count)."""
    return [j for j in range(count) if (j + 1) * quota // count > j * quota // count]


def slow_budget(tensors, method, budget, targets, seed=0, ties="positions") -> dict:
    """name -> bool mask [rows, cols]. ``tensors``: [(name, ft [rows, cols], base)] in
    plan order; ``targets``: name -> values to keep. Ranks by normalised bin; the bin
    where the count is met (the cut bin) is taken by ``ties``: ``positions``, in (tensor
    order, row-major position); ``scrambled``, shared among tensors in proportion to
    their positions in it, floor(q * before / total) steps, and spread evenly over each
    one's; ``values``, whole."""
    keys = []
    for t, (name, ft, base) in enumerate(tensors):
        bins = score_bins(method, ft, base, name, seed)
        nb = normalised(bins, shift(bins, method))
        for p, v in enumerate(nb.ravel()):
            keys.append((-int(v), t, p))
    masks = {name: np.zeros(ft.size, bool) for name, ft, _ in tensors}
    names = [name for name, _, _ in tensors]
    groups = [sorted(keys)] if budget == "global" else \
        [sorted(k for k in keys if k[1] == t) for t in range(len(names))]
    wants = [sum(targets.values())] if budget == "global" else [targets[n] for n in names]
    for group, want in zip(groups, wants):
        for _, t, p in _chosen(group, want, ties, len(names)):
            masks[names[t]][p] = True
    return {name: masks[name].reshape(ft.shape) for name, ft, _ in tensors}


def _chosen(ordered, want, ties, tensors) -> list:
    """The keys kept of ``ordered`` (sorted by bin, tensor, position) for a target."""
    if want >= len(ordered) or ties == "positions":
        return ordered[:want]
    cut = ordered[want][0]  # the bin of the first key left out
    above = [k for k in ordered if k[0] < cut]
    tied = [k for k in ordered if k[0] == cut]
    quota = want - len(above)
    if ties == "values":  # a bin no kept position is in is not a tie
        return above + (tied if quota else [])
    per = [[k for k in tied if k[1] == t] for t in range(tensors)]
    out, before = list(above), 0
    for keys in per:
        share = (before + len(keys)) * quota // len(tied) - before * quota // len(tied)
        before += len(keys)
        out += [keys[j] for j in spread(share, len(keys))]
    return out
