"""Verify's comparison of a rebuilt block with the fine-tune and the base: the bit checks and
the two error norms, serial and with no temporaries (verify runs blocks on a pool of
threads, one block a thread).
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from ._jit import JIT, cached, njit
from .pack import flat_bits

KEPT_DIFFERS = 1
"""A kept position of the rebuilt block differs from the fine-tune."""
RESET_DIFFERS = 2
"""A position that is not kept differs from the base."""
DIFFERS = 4
"""Some position differs from the fine-tune (wrong for a tensor recorded unchanged)."""

@njit(**JIT)
def _flags(got, want, base, kept, has_base):
    # OR-ed without branches (about 10x faster than testing each position).
    differs = np.uint8(0)
    kept_differs = np.uint8(0)
    reset_differs = np.uint8(0)
    for i in range(got.size):
        k = np.uint8(kept[i])
        d = np.uint8(got[i] != want[i])
        differs |= d
        kept_differs |= d & k
        if has_base:
            reset_differs |= np.uint8(got[i] != base[i]) & (k ^ np.uint8(1))
    return np.int64(differs) * 4 + np.int64(kept_differs) + np.int64(reset_differs) * 2


@njit(**JIT)
def _norms_table(got, want, base, table, sums):
    change = 0.0
    error = 0.0
    for i in range(got.size):
        w = np.float64(table[want[i]])
        c = w - np.float64(table[base[i]])
        e = np.float64(table[got[i]]) - w
        change += c * c
        error += e * e
    sums[0] = change
    sums[1] = error


@njit(**JIT)
def _norms_floats(got, want, base, sums):
    change = 0.0
    error = 0.0
    for i in range(got.size):
        w = np.float64(want[i])
        c = w - np.float64(base[i])
        e = np.float64(got[i]) - w
        change += c * c
        error += e * e
    sums[0] = change
    sums[1] = error


@njit(**JIT)
def _norms_nonfinite(got, want, base, gbits, wbits, bbits, sums):
    """The norms of a block whose plain sums came out inf or NaN: only positions whose bit
    patterns differ count, so an inf or a NaN both sides share adds nothing (inf - inf
    would add NaN); a NaN difference adds inf. Equal to the plain sums on finite values,
    and about four times slower (branches), so only run where those are not finite."""
    change = 0.0
    error = 0.0
    for i in range(got.size):
        if wbits[i] != bbits[i]:
            c = np.float64(want[i]) - np.float64(base[i])
            change += c * c if c == c else np.inf
        if gbits[i] != wbits[i]:
            e = np.float64(got[i]) - np.float64(want[i])
            error += e * e if e == e else np.inf
    sums[0] = change
    sums[1] = error


def compiled() -> bool:
    """Whether the comparison's kernels are in numba's on-disk cache (else the first
    block compared in this process compiles them, a few seconds)."""
    return cached(_flags)


_TABLES: dict = {}


def _table(code: str) -> np.ndarray:
    """float32 value of every bit pattern of a float dtype of at most 16 bits."""
    if code not in _TABLES:
        width = dtypes.lookup(code).storage.itemsize
        bits = np.arange(1 << (8 * width), dtype=np.dtype(f"u{width}"))
        values = dtypes.widen_to_f32(bits.view(dtypes.lookup(code).storage), code)
        _TABLES[code] = np.ascontiguousarray(values, np.float32)
    return _TABLES[code]


def compare_block(got: np.ndarray, want: np.ndarray, base: np.ndarray | None,
                  kept: np.ndarray, code: str) -> tuple:
    """(flags, ||want - base||^2, ||got - want||^2) of a rebuilt block ``got`` against the
    fine-tune's rows ``want`` and the base's ``base`` (None: the tensor has no base), all in
    the storage dtype of ``code`` and one shape; ``kept`` (bool, same shape) marks the
    positions taken from the diff.

    Flags (OR of :data:`KEPT_DIFFERS`, :data:`RESET_DIFFERS`, :data:`DIFFERS`) compare bit
    patterns. The norms are sums of squares in float64 of the exact values, over the
    positions whose bit patterns differ (so an inf or a NaN shared adds nothing; a NaN
    difference adds inf), 0.0 for integer dtypes or without a base. Two passes (the flags,
    then the norms), O(size), no temporaries larger than a 65536-entry table (about 1.5 ns
    a value, one thread).
    """
    if not got.shape == want.shape == kept.shape or (base is not None
                                                    and base.shape != got.shape):
        raise ValueError("compare_block takes arrays of one shape")
    entry = dtypes.lookup(code)
    g, w = flat_bits(got), flat_bits(want)
    b = g if base is None else flat_bits(base)
    k = np.ascontiguousarray(kept, dtype=np.bool_).reshape(-1)
    flags = _flags(g, w, b, k, base is not None)
    sums = np.zeros(2, np.float64)
    if entry.is_float and base is not None:
        wide = {"F32": np.float32, "F64": np.float64}.get(code)
        if wide is not None:
            _norms_floats(g.view(wide), w.view(wide), b.view(wide), sums)
        else:
            _norms_table(g, w, b, _table(code), sums)
        if not (np.isfinite(sums[0]) and np.isfinite(sums[1])):  # an inf or a NaN
            values = ((g.view(wide), w.view(wide), b.view(wide)) if wide is not None
                      else tuple(_table(code)[x] for x in (g, w, b)))  # float32 copies
            _norms_nonfinite(*values, g, w, b, sums)
    return int(flags), float(sums[0]), float(sums[1])


def first_rows(got: np.ndarray, want: np.ndarray, base: np.ndarray | None,
               kept: np.ndarray) -> dict:
    """For a block :func:`compare_block` flagged: each flag it raised -> the first row of
    the block ([rows, cols], arrays as there) where it holds. NumPy, with temporaries of
    the block's size: for the failure path only."""
    rows = got.shape[0]
    g, w = flat_bits(got).reshape(rows, -1), flat_bits(want).reshape(rows, -1)
    k = np.asarray(kept, dtype=np.bool_).reshape(rows, -1)
    differs = g != w
    where = {DIFFERS: differs, KEPT_DIFFERS: differs & k}
    if base is not None:
        where[RESET_DIFFERS] = (g != flat_bits(base).reshape(rows, -1)) & ~k
    found = {}
    for flag, cells in where.items():
        hit = np.flatnonzero(cells.any(axis=1))
        if hit.size:
            found[flag] = int(hit[0])
    return found
