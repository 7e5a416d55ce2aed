"""Numba kernels that pack a selection for the diff (row bitmasks and kept values) and
unpack it again for rebuild.

The NumPy equivalent (``np.packbits(mask, axis=1, bitorder="little")`` and
``values[mask]``) runs on one core and makes two passes; these pack a row's bits, then
walk its set bits.
Values are moved as unsigned integers of the element width, so every bit pattern
(NaN payloads, -0.0, bf16) is copied exactly. Packing is serial: it runs on the engine's
encoder thread, beside the (parallel) selection kernel. Unpacking turns a packed mask into
the kept positions (`kept_index`, a table lookup per mask byte), then gathers the base at
them (`take_at`) or copies the base and writes the kept values over it (`put_at`); these
and the row popcounts are parallel.
"""

from __future__ import annotations

import numpy as np

from numba.cpython.unsafe.numbers import trailing_zeros

from ._jit import JIT, PARALLEL, njit, prange


@njit(**JIT)
def _pack_bits(mask, r, packed):
    """Row ``r`` of ``mask`` (uint8 0/1) as bits, least significant first, into ``packed``."""
    cols = mask.shape[1]
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
def _take_set(word, col, a_in, b_in, pair, r, o, end, a_out, b_out):
    """Columns ``col + i`` for the set bits ``i`` of ``word`` (uint64), in order: row ``r``
    of ``a_in`` (and with ``pair`` of ``b_in``) there copied to ``a_out`` (``b_out``) from
    ``o``, never at or past ``end``. Returns the next free slot. One step a set bit."""
    while word and o < end:
        j = col + np.int64(trailing_zeros(word))
        a_out[o] = a_in[r, j]
        if pair:
            b_out[o] = b_in[r, j]
        o += 1
        word &= word - np.uint64(1)
    return o


@njit(**JIT)
def _cursor_row(mask, a_in, r, o, end, a_out):
    # The value at the cursor is overwritten until a kept one lands, and the cursor
    # advances by the mask bit: no data-dependent branch (the `o < end` test, well
    # predicted, keeps the row's last kept value from writing into the next row).
    for j in range(mask.shape[1]):
        if o < end:
            a_out[o] = a_in[r, j]
            o += mask[r, j]


@njit(**JIT)
def _pack_serial(mask, a_in, b_in, pair, offsets, packed, a_out, b_out):
    """Each row's bits into ``packed`` and its kept values of ``a_in`` (and with ``pair``
    of ``b_in``) into ``a_out`` (``b_out``). A row with at most 3/4 of its positions kept
    walks its set bits 64 columns at a time (at a quarter kept, 0.4 against 0.9 ms a
    1M-value bf16 frame: docs/benchmarks.md); a denser one loops over every column
    (`_cursor_row`). Offsets past a row's count are never written."""
    cols = mask.shape[1]
    nbytes = packed.shape[1]
    whole = nbytes - nbytes % 8
    for r in range(mask.shape[0]):
        _pack_bits(mask, r, packed)
        o, end = offsets[r], offsets[r + 1]
        if (end - o) * 4 > cols * 3:
            _cursor_row(mask, a_in, r, o, end, a_out)
            if pair:
                _cursor_row(mask, b_in, r, o, end, b_out)
            continue
        for b0 in range(0, whole, 8):
            word = np.uint64(0)
            for t in range(8):  # unrolled into one load
                word |= np.uint64(packed[r, b0 + t]) << np.uint64(8 * t)
            o = _take_set(word, b0 * 8, a_in, b_in, pair, r, o, end, a_out, b_out)
        for b in range(whole, nbytes):
            o = _take_set(np.uint64(packed[r, b]), b * 8, a_in, b_in, pair, r, o, end, a_out,
                          b_out)


@njit(**JIT)
def _row_counts(mask, out):
    for r in range(mask.shape[0]):
        n = 0
        for j in range(mask.shape[1]):
            n += mask[r, j]
        out[r] = n


def row_counts(mask: np.ndarray) -> np.ndarray:
    """Kept positions of each row of ``mask`` bool [rows, cols] -> int64 [rows]. Serial (it
    runs on a coding thread), O(rows * cols)."""
    out = np.zeros(mask.shape[0], dtype=np.int64)
    if mask.size:
        _row_counts(np.ascontiguousarray(mask).view(np.uint8), out)
    return out


def _pack_outputs(mask, counts, dtype):
    rows, cols = mask.shape
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    packed = np.empty((rows, (cols + 7) // 8), dtype=np.uint8)
    return offsets, packed, np.empty(int(offsets[-1]), dtype=dtype)


def pack_pair(mask: np.ndarray, values: np.ndarray, base: np.ndarray, counts: np.ndarray):
    """(packed bits, kept values of ``values``, kept values of ``base``): :func:`pack_rows`
    of two tensors of one shape under one mask, gathered together. Cost O(rows * cols)."""
    if values.itemsize != base.itemsize:
        raise ValueError(f"values of {values.itemsize} and {base.itemsize} bytes")
    packed, a_out, b_out = _pack(mask, values, base, counts)
    return packed, a_out.view(values.dtype), b_out.view(base.dtype)


def pack_rows(mask: np.ndarray, values: np.ndarray, counts: np.ndarray):
    """(packed bits uint8 [rows, ceil(cols/8)], kept values [sum(counts)]) of ``values``
    [rows, cols].

    ``mask`` is bool [rows, cols], ``counts`` its per-row kept counts (they size the
    output, so they must be the mask's own counts). Bits are least significant first
    (docs/format.md 2.2). Cost O(rows * cols).
    """
    packed, out, _ = _pack(mask, values, None, counts)
    return packed, out.view(values.dtype)


def _pack(mask, values, base, counts):
    """(packed bits, kept values, kept base values) as unsigned ints of the values' width;
    with ``base`` None the last is the kept values again."""
    rows, cols = mask.shape
    width = np.dtype(f"u{values.itemsize}")
    offsets, packed, a_out = _pack_outputs(mask, counts, width)
    b_out = a_out if base is None else np.empty_like(a_out)
    if rows and cols:
        a_in = values.reshape(rows, cols).view(width)
        b_in = a_in if base is None else base.reshape(rows, cols).view(width)
        _pack_serial(np.ascontiguousarray(mask).view(np.uint8), a_in, b_in, base is not None,
                     offsets, packed, a_out, b_out)
    return packed, a_out, b_out


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


def padding_bits_set(packed: np.ndarray, cols: int) -> bool:
    """Whether a bit of ``packed`` (uint8 [rows, ceil(cols/8)]) past column ``cols`` is set;
    the format requires them to be 0, and a set one would shift its row's values. O(rows)."""
    return bool(cols % 8) and bool((packed[:, -1] >> (cols % 8)).any())


def _bit_tables():
    """For each byte value: its set bits' positions (padded with 0) and how many there are."""
    bits = np.zeros((256, 8), np.uint8)
    for byte in range(256):
        found = [t for t in range(8) if byte >> t & 1]
        bits[byte, :len(found)] = found
    return bits.reshape(-1), np.array([bin(b).count("1") for b in range(256)], np.uint8)


_BITS, _BIT_COUNT = _bit_tables()


@njit(**JIT)
def _index_row(packed, r, cols, o, end, bits, count, idx):
    # A byte's set-bit positions come from a table: 8 unconditional stores at the cursor,
    # which then advances by the byte's count (no branch per bit, ~8x fewer cursor steps
    # than bit by bit). Stores past the byte's own bits land where later bytes write, or
    # past the row's last kept slot; near ``end`` they are bounded, so rows can run in
    # parallel. Returns the cursor: ``end`` when the row's bits match its count.
    full = cols // 8
    first = np.int64(r) * cols
    for b in range(full):
        byte = np.int64(packed[r, b])
        j0 = first + b * 8
        if o + 8 <= end:
            for t in range(8):
                idx[o + t] = j0 + bits[byte * 8 + t]
        else:
            for t in range(8):
                if o + t < end:
                    idx[o + t] = j0 + bits[byte * 8 + t]
        o += np.int64(count[byte])
    for j in range(full * 8, cols):
        if (packed[r, j >> 3] >> (j & 7)) & 1:
            if o < end:
                idx[o] = first + j
            o += 1
    return o


@njit(**PARALLEL)
def _kept_index(packed, cols, offsets, bits, count, idx):
    bad = 0
    for r in prange(packed.shape[0]):
        start, end = offsets[r], offsets[r + 1]
        got = _index_row(packed, r, cols, start, end, bits, count, idx)
        if got != end:  # bits past the row's end, or counts that are not the mask's
            for k in range(max(start, min(got, end)), end):
                idx[k] = np.int64(r) * cols  # in bounds, whatever happens next
            bad += 1
    return bad


def kept_index(packed: np.ndarray, cols: int, counts: np.ndarray) -> np.ndarray:
    """Flat positions (row * cols + column, ascending) of the 1 bits of ``packed`` (uint8
    [rows, ceil(cols/8)]); ``counts`` are the rows' set-bit counts. int32 where the
    positions fit, else int64. Raises ValueError when a row's bits do not number its
    count (a padding bit past ``cols`` is set, or the counts are not the mask's).
    Parallel over rows, O(rows * cols / 8 + kept)."""
    rows = packed.shape[0]
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    idx = np.empty(int(offsets[-1]), np.int32 if rows * cols < 2**31 else np.int64)
    if idx.size and _kept_index(np.ascontiguousarray(packed), cols, offsets, _BITS,
                                _BIT_COUNT, idx):
        raise ValueError("mask bits do not match the row counts")
    return idx


@njit(**PARALLEL)
def _take(src, idx, out):
    for k in prange(idx.shape[0]):
        out[k] = src[idx[k]]


@njit(**PARALLEL)
def _put(out, idx, values):
    for k in prange(idx.shape[0]):
        out[idx[k]] = values[k]


def flat_bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of ``a``, flat, as unsigned integers of its width (a view where
    ``a`` is C-contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(f"u{a.itemsize}")


def take_at(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src.reshape(-1)[idx]`` for positions from :func:`kept_index` (bit patterns kept)."""
    out = np.empty(idx.size, np.dtype(f"u{src.itemsize}"))
    if idx.size:
        _take(flat_bits(src), idx, out)
    return out.view(src.dtype)


def put_at(out: np.ndarray, base: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """``out`` (C-contiguous) = ``base`` (same shape and width; may be ``out`` itself or
    read-only) with ``values`` written at the flat positions ``idx`` from
    :func:`kept_index`."""
    if not out.flags.c_contiguous:
        raise ValueError("the output must be C-contiguous")
    width = np.dtype(f"u{out.itemsize}")
    if out is not base:
        np.copyto(out.view(width), base.view(width))
    if idx.size:
        _put(out.reshape(-1).view(width), idx, flat_bits(values))


def merge_into(out: np.ndarray, base: np.ndarray, packed: np.ndarray, values: np.ndarray,
               counts: np.ndarray) -> None:
    """``out`` [rows, cols] = ``base`` (same shape and width, may be read-only or ``out``
    itself) with the positions where ``packed`` has a 1 bit replaced by ``values`` in
    row-major order.

    ``counts`` are the rows' set-bit counts, checked by the caller to add up to
    ``values.size``. O(rows * cols); parallel over rows.
    """
    kept = int(np.sum(counts))
    if kept > values.size:
        raise ValueError("fewer values than mask bits")
    put_at(out, base, kept_index(packed, out.shape[1], counts), values.reshape(-1)[:kept])

