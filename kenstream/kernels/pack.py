"""Numba kernels that pack a selection for the diff (row bitmasks and kept values) and
unpack it again for rebuild.

The NumPy equivalent (``np.packbits(mask, axis=1, bitorder="little")`` and
``values[mask]``) runs on one core and makes two passes; these make one pass per row.
Values are moved as unsigned integers of the element width, so every bit pattern
(NaN payloads, -0.0, bf16) is copied exactly. Packing is serial: it runs on the engine's
encoder thread, beside the (parallel) selection kernel. Unpacking (`merge_into`: base rows
with the kept values written over them, in one pass) and row popcounts are parallel.
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


@njit(**JIT)
def _merge_row(base, packed, values, r, o, last, out):
    # Branch-free over the bits of a byte: every position loads the value at the cursor
    # (clamped, so the load past the row's last kept value stays in bounds) and takes it
    # where the bit is set, the base where it is not; the cursor advances by the bit. A
    # random mask defeats the branch predictor, so this runs ~2x a branching loop.
    # ``base`` may be ``out`` itself (unpack in place): each position is read then written.
    cols = out.shape[1]
    full = cols // 8
    for b in range(full):
        byte = packed[r, b]
        j0 = b * 8
        if byte == 0:
            for t in range(8):
                out[r, j0 + t] = base[r, j0 + t]
            continue
        for t in range(8):
            bit = (byte >> t) & 1
            v = values[min(o, last)]
            out[r, j0 + t] = v if bit else base[r, j0 + t]
            o += bit
    for j in range(full * 8, cols):
        if (packed[r, j >> 3] >> (j & 7)) & 1:
            out[r, j] = values[min(o, last)]
            o += 1
        else:
            out[r, j] = base[r, j]


@njit(**PARALLEL)
def _merge_parallel(base, packed, values, offsets, out):
    last = values.size - 1
    for r in prange(out.shape[0]):
        _merge_row(base, packed, values, r, offsets[r], last, out)


@njit(**JIT)
def _popcount_byte(b):
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


@njit(**PARALLEL)
def _row_popcounts(packed, out):
    for r in prange(packed.shape[0]):
        n = 0
        for b in range(packed.shape[1]):
            n += _popcount_byte(np.int64(packed[r, b]))
        out[r] = n


def row_popcounts(packed: np.ndarray) -> np.ndarray:
    """Set bits of each row of a packed mask ``packed`` uint8 [rows, nbytes] -> int64 [rows].

    Padding bits count too (they must be 0). Parallel over rows, O(rows * nbytes), no
    temporary larger than the result.
    """
    out = np.zeros(packed.shape[0], dtype=np.int64)
    if packed.size:
        _row_popcounts(np.ascontiguousarray(packed), out)
    return out


def merge_into(out: np.ndarray, base: np.ndarray, packed: np.ndarray, values: np.ndarray,
               counts: np.ndarray) -> None:
    """``out`` [rows, cols] = ``base`` (same shape and width, may be read-only) with the
    positions where ``packed`` has a 1 bit replaced by ``values`` in row-major order.

    ``counts`` are the rows' set-bit counts, checked by the caller to add up to
    ``values.size``. In one parallel pass over rows; O(rows * cols).
    """
    rows, cols = out.shape
    width = np.dtype(f"u{out.itemsize}")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > values.size:
        raise ValueError("fewer values than mask bits")
    if not (rows and cols):
        return
    if not values.size:  # no set bits (checked above): the base as it is
        np.copyto(out, base)
        return
    _merge_parallel(base.view(width), np.ascontiguousarray(packed),
                    values.reshape(-1).view(width), offsets, out.view(width))


@njit(**JIT)
def _gather_row(src, packed, r, o, end, out):
    # As _pack_row: every position is written at the cursor, which advances by its bit,
    # so a kept value is never overwritten and a random mask costs no mispredicted branch
    # (about twice as fast as testing each bit); ``o < end`` keeps the writes inside the
    # row's own slots, so rows can run in parallel.
    cols = src.shape[1]
    full = cols // 8
    for b in range(full):
        byte = packed[r, b]
        j0 = b * 8
        for t in range(8):
            if o < end:
                out[o] = src[r, j0 + t]
                o += (byte >> t) & 1
    for j in range(full * 8, cols):
        if o < end:
            out[o] = src[r, j]
            o += (packed[r, j >> 3] >> (j & 7)) & 1


@njit(**PARALLEL)
def _gather_parallel(src, packed, offsets, out):
    for r in prange(src.shape[0]):
        _gather_row(src, packed, r, offsets[r], offsets[r + 1], out)


def gather_packed(src: np.ndarray, packed: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The values of ``src`` [rows, cols] where ``packed`` (uint8 [rows, ceil(cols/8)]) has
    a 1 bit, row-major, as a new array; ``counts`` are the rows' set-bit counts (checked
    by the caller). Parallel over rows, O(rows * cols)."""
    rows = src.shape[0]
    width = np.dtype(f"u{src.itemsize}")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=width)
    if out.size:
        _gather_parallel(np.ascontiguousarray(src).view(width), np.ascontiguousarray(packed),
                         offsets, out)
    return out.view(src.dtype)
