"""Numba kernels that pack a selection for the diff: row bitmasks and kept values.

The NumPy equivalent (``np.packbits(mask, axis=1, bitorder="little")`` and
``values[mask]``) runs on one core and makes two passes; these do one pass per row in
parallel over rows, which keeps the encoder from being a large share of compress time.
Values are moved as unsigned integers of the element width, so every bit pattern
(NaN payloads, -0.0, bf16) is copied exactly.
"""

from __future__ import annotations

import numpy as np

from ._jit import PARALLEL, njit, prange


@njit(**PARALLEL)
def _pack(mask, values_in, offsets, packed, values_out):
    rows, cols = mask.shape
    nbytes = packed.shape[1]
    for r in prange(rows):
        o = offsets[r]
        for b in range(nbytes):
            byte = 0
            base = b * 8
            for t in range(min(8, cols - base)):
                if mask[r, base + t]:
                    byte |= 1 << t
                    values_out[o] = values_in[r, base + t]
                    o += 1
            packed[r, b] = byte


def pack_rows(mask: np.ndarray, values: np.ndarray, counts: np.ndarray):
    """(packed bits uint8 [rows, ceil(cols/8)], kept values [sum(counts)]) of ``values`` [rows, cols].

    ``mask`` is bool [rows, cols], ``counts`` its per-row kept counts. Bits are least
    significant first (docs/format.md 2.2). Cost O(rows * cols), parallel over rows.
    """
    rows, cols = mask.shape
    width = np.dtype(f"u{values.itemsize}")
    bits = values.reshape(rows, cols).view(width)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    packed = np.empty((rows, (cols + 7) // 8), dtype=np.uint8)
    out = np.empty(int(offsets[-1]), dtype=width)
    if rows and cols:
        _pack(np.ascontiguousarray(mask), bits, offsets, packed, out)
    return packed, out.view(values.dtype)
