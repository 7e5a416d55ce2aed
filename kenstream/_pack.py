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
    # mask is uint8 0/1. The value at the cursor is overwritten until a kept one lands, and
    # the cursor advances by the mask bit: no data-dependent branch. Once the row's last
    # kept value is placed the cursor sits on the next row's first slot, which is never
    # written (the well-predicted `o < end` test), so rows can run in parallel.
    rows, cols = mask.shape
    full = cols // 8
    for r in prange(rows):
        o = offsets[r]
        end = offsets[r + 1]
        for j in range(cols):
            if o < end:
                values_out[o] = values_in[r, j]
                o += mask[r, j]
        for b in range(full):
            j = b * 8
            packed[r, b] = (mask[r, j] | (mask[r, j + 1] << 1) | (mask[r, j + 2] << 2)
                            | (mask[r, j + 3] << 3) | (mask[r, j + 4] << 4)
                            | (mask[r, j + 5] << 5) | (mask[r, j + 6] << 6)
                            | (mask[r, j + 7] << 7))
        if full * 8 < cols:
            byte = 0
            for t in range(cols - full * 8):
                byte |= mask[r, full * 8 + t] << t
            packed[r, full] = byte


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
        _pack(np.ascontiguousarray(mask).view(np.uint8), bits, offsets, packed, out)
    return packed, out.view(values.dtype)
