"""Numba kernels that pack a selection for the diff: row bitmasks and kept values.

The NumPy equivalent (``np.packbits(mask, axis=1, bitorder="little")`` and
``values[mask]``) runs on one core and makes two passes; these make one pass per row.
Values are moved as unsigned integers of the element width, so every bit pattern
(NaN payloads, -0.0, bf16) is copied exactly. Packing is serial: it runs on the engine's
encoder thread, beside the (parallel) selection kernel. Unpacking for rebuild is parallel.
"""

from __future__ import annotations

import numpy as np

from ._jit import JIT, PARALLEL, njit, prange


@njit(**JIT)
def _pack_row(mask, values_in, r, start, end, packed, values_out):
    # mask is uint8 0/1. The value at the cursor is overwritten until a kept one lands, and
    # the cursor advances by the mask bit: no data-dependent branch. Once the row's last
    # kept value is placed the cursor sits on the next row's first slot, which is never
    # written (the well-predicted `o < end` test), so rows can run in parallel.
    cols = mask.shape[1]
    o = start
    for j in range(cols):
        if o < end:
            values_out[o] = values_in[r, j]
            o += mask[r, j]
    full = cols // 8
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


@njit(**JIT)
def _pack_serial(mask, values_in, offsets, packed, values_out):
    for r in range(mask.shape[0]):
        _pack_row(mask, values_in, r, offsets[r], offsets[r + 1], packed, values_out)


def pack_rows(mask: np.ndarray, values: np.ndarray, counts: np.ndarray):
    """(packed bits uint8 [rows, ceil(cols/8)], kept values [sum(counts)]) of ``values`` [rows, cols].

    ``mask`` is bool [rows, cols], ``counts`` its per-row kept counts (they size the
    output, so they must be the mask's own counts). Bits are least significant first
    (docs/format.md 2.2). Cost O(rows * cols).
    """
    rows, cols = mask.shape
    width = np.dtype(f"u{values.itemsize}")
    bits = values.reshape(rows, cols).view(width)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    packed = np.empty((rows, (cols + 7) // 8), dtype=np.uint8)
    out = np.empty(int(offsets[-1]), dtype=width)
    if rows and cols:
        _pack_serial(np.ascontiguousarray(mask).view(np.uint8), bits, offsets, packed, out)
    return packed, out.view(values.dtype)


@njit(**PARALLEL)
def _unpack_parallel(packed, values, offsets, out):
    for r in prange(out.shape[0]):
        o = offsets[r]
        for j in range(out.shape[1]):
            if (packed[r, j >> 3] >> (j & 7)) & 1:
                out[r, j] = values[o]
                o += 1


def unpack_into(out: np.ndarray, packed: np.ndarray, values: np.ndarray, counts: np.ndarray):
    """Write ``values`` (row-major kept order) into ``out`` [rows, cols] where ``packed``
    [rows, ceil(cols/8)] has a 1 bit; ``counts`` are the rows' set-bit counts, which the
    caller has checked add up to ``values.size``. Parallel over rows, O(rows * cols)."""
    rows, cols = out.shape
    width = np.dtype(f"u{out.itemsize}")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > values.size:
        raise ValueError("fewer values than mask bits")
    if rows and cols:
        _unpack_parallel(np.ascontiguousarray(packed), values.reshape(-1).view(width),
                         offsets, out.view(width))
