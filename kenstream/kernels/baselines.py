"""Baseline selection rules to compare KEN against: ``delta``, ``magnitude`` and ``random``.

Each rule keeps exactly ``min(k, cols)`` positions in every row of a fine-tuned tensor viewed
as ``[rows, cols]`` (docs/format.md section 2.1; more with ``ties="values"``) and writes a
bool mask of the tensor's shape:

- ``delta``: the ``k`` largest ``|ft - base|``, both widened to float32 first and subtracted in
  float32.
- ``magnitude``: the ``k`` largest ``|ft|`` (float32). ``-0.0`` and ``0.0`` are equal.
- ``random``: a uniform ``k``-subset of the columns, drawn by Floyd's algorithm from a
  splitmix64 stream seeded by ``(seed, salt, row_offset + row)`` only, so the mask does not
  depend on the thread count or on how the caller cuts a tensor into row chunks.

The two ranking rules break ties at a row's k-th largest key by the tie mode
(docs/algorithm.md 2.2): ``positions`` the lowest columns, ``scrambled`` the first columns
from one drawn for the row, wrapping around (``_splitmix.rotation``), ``values`` all of them.
On bf16 rows, whose changes take few distinct values, lowest columns kept twice the share of
the first quarter of a row as of the last at keep 0.25; a rotation keeps the taken ties
together, so the mask codes as compactly, and favours no column across rows.

Inputs are float32, float64, float16 or bfloat16 given as its uint16 bit pattern; each row is
widened to float32 into a scratch buffer (float64 is rounded to nearest), so a read-only
memory map is read once, row by row, and never copied whole.

The two ranking rules find the k-th largest key with a byte-wise radix select on the float32
bit patterns (non-negative floats order like their bits): O(cols) per row whatever the data,
ties included, with no sort. Rows run in parallel (``prange`` over blocks of rows, each block
with its own scratch), and a row's result never depends on another row.
"""

from __future__ import annotations

import numpy as np

from ..errors import MismatchError, NonFiniteError, SelectionError
from ..settings import METHODS as _ALL_METHODS
from ._inputs import (SCRAMBLED, TIE_CODES, VALUES, as_array, as_u64, check_k, check_out,
                      check_row_offset, check_ties, words)
from ._jit import JIT, PARALLEL, njit, prange
from ._rowprep import widen_row
from ._splitmix import below, rotation, row_state

METHODS = tuple(m for m in _ALL_METHODS if m != "ken")

_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_ROWS_PER_BLOCK = 16

# Status codes a kernel leaves per row; the Python wrapper turns them into errors.
_OK, _BAD_FT, _BAD_BASE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Serial helpers


@njit(**JIT)
def _kth_largest(keys, k, cand, hist):
    """Radix select on uint32 ``keys``: the k-th largest value ``t`` and how many of the
    entries equal to ``t`` belong to the top ``k`` (the rest of the top k is ``> t``).

    ``cand`` (uint32, len(keys)) and ``hist`` (int64[256]) are scratch. 1 <= k <= len(keys).
    Four byte passes over a shrinking candidate set: O(len(keys)).
    """
    src = keys
    m = keys.shape[0]
    rank = k
    for p in range(4):
        shift = np.uint32(24 - 8 * p)
        hist[:] = 0
        for j in range(m):
            hist[(src[j] >> shift) & np.uint32(255)] += 1
        b = 255
        above = 0
        while above + hist[b] < rank:
            above += hist[b]
            b -= 1
        rank -= above
        if hist[b] != m:
            # Keep only the bucket that holds the k-th largest; w <= j, so in place is safe.
            # Branch-free: the bucket test is a coin flip, a branch would mispredict.
            ub = np.uint32(b)
            w = 0
            for j in range(m):
                v = src[j]
                cand[w] = v
                w += np.int64(((v >> shift) & np.uint32(255)) == ub)
            m = w
            src = cand
    return src[0], rank


@njit(**JIT)
def _mark_top(keys, k, cand, hist, mask, every_tie, c):
    """mask[j] = keys[j] is among the k largest. Of the keys equal to the k-th largest,
    ``every_tie`` keeps all (``ties="values"``: at least min(k, n) set); otherwise exactly
    min(k, n) are set, the ties taken in the order that lists position ``(c + s) mod n`` at
    place s: from the lowest position (c = 0), or from a column drawn for the row
    (``_splitmix.rotation``)."""
    n = keys.shape[0]
    if k >= n:
        for j in range(n):
            mask[j] = True
        return
    t, need_eq = _kth_largest(keys, k, cand, hist)
    # Two passes: the first has no loop-carried state, so it vectorises; the second takes
    # the ties in their order and stops at the last one needed (need_eq >= 1).
    if every_tie:
        for j in range(n):
            mask[j] = keys[j] >= t
        return
    for j in range(n):
        mask[j] = keys[j] > t
    taken = 0
    p = c
    for _ in range(n):
        if keys[p] == t:
            mask[p] = True
            taken += 1
            if taken == need_eq:
                break
        p += 1
        if p == n:
            p = 0


@njit(**JIT)
def score_row(ft, ft_kind, base, base_kind, use_base, abits, bbits, wide):
    """The float32 bits of ``|ft - base|`` (use_base) or ``|ft|`` of one row into
    ``abits`` (uint32 [n]; ``bbits`` the base's scratch, ``wide`` uint64 [n]); returns
    _OK, or _BAD_FT / _BAD_BASE for a row with a NaN or Inf. O(n)."""
    if not widen_row(ft, ft_kind, abits, wide):
        return _BAD_FT
    n = abits.shape[0]
    if use_base:
        if not widen_row(base, base_kind, bbits, wide):
            return _BAD_BASE
        abuf, bbuf = abits.view(np.float32), bbits.view(np.float32)
        for j in range(n):
            abuf[j] = abs(abuf[j] - bbuf[j])
    else:
        for j in range(n):
            abits[j] = abits[j] & _ABS
    return _OK


def raise_bad_rows(status, row_offset) -> None:
    """NonFiniteError naming the first row a kernel marked bad in ``status``, if any."""
    bad = np.flatnonzero(status)
    if bad.size:
        i = int(bad[0])
        in_base = bool(status[i] == _BAD_BASE)
        err = NonFiniteError(f"NaN or Inf in the {'base' if in_base else 'fine-tune'} tensor",
                             row=int(row_offset) + i)
        err.in_base = in_base
        raise err


@njit(**JIT)
def _mark_random(state, k, mask):
    """Floyd's sampling: a uniform min(k, n)-subset of range(n), using ``mask`` as the set."""
    n = mask.shape[0]
    for j in range(n):
        mask[j] = k >= n
    if k >= n:
        return
    for j in range(n - k, n):
        state, t = below(state, np.uint64(j + 1))
        if mask[t]:
            mask[j] = True
        else:
            mask[t] = True


# ---------------------------------------------------------------------------------------------
# Parallel drivers: one prange over blocks of rows, scratch allocated once per block.


@njit(**PARALLEL)
def _rank_kernel(ft, ft_kind, base, base_kind, use_base, k, out, status, ties, seed, salt,
                 row_offset):
    """Top-k of |ft| (use_base False) or |ft - base| per row into ``out`` (bool[rows, cols]),
    equal keys by the tie mode ``ties`` (a code of ``_inputs.TIE_CODES``; row ``i``'s
    rotation is drawn from (seed, salt, row_offset + i), the stream of KEN's scrambled
    order).

    ``ft`` and ``base`` are uint16 word views of the rows (``_inputs.words``), widened by
    ``_rowprep.widen_row``. ``status[i]`` (uint8[rows]) becomes _BAD_FT / _BAD_BASE for a
    row with a NaN or Inf; the mask of such a row is unspecified. O(rows * cols) time,
    O(cols) scratch per block.
    """
    rows, n = out.shape
    nblocks = (rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for blk in prange(nblocks):
        abits = np.empty(n, np.uint32)
        bbits = np.empty(n if use_base else 0, np.uint32)
        wide = np.empty(n, np.uint64)
        cand = np.empty(n, np.uint32)
        hist = np.empty(256, np.int64)
        stop = min(rows, (blk + 1) * _ROWS_PER_BLOCK)
        for i in range(blk * _ROWS_PER_BLOCK, stop):
            status[i] = score_row(ft[i], ft_kind, base[i], base_kind, use_base, abits, bbits,
                                  wide)
            if status[i] == _OK:
                c = np.int64(0)
                if ties == SCRAMBLED:
                    c = rotation(n, seed, salt, row_offset + np.uint64(i))
                _mark_top(abits, k, cand, hist, out[i], ties == VALUES, c)


@njit(**PARALLEL)
def _random_kernel(ft, ft_kind, k, seed, salt, row_offset, out, status):
    """Random min(k, cols)-subset per row into ``out``; ``ft`` is read only to refuse NaN/Inf.

    Row ``i`` depends on (seed, salt, row_offset + i) alone. O(rows * cols).
    """
    rows, n = out.shape
    nblocks = (rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for blk in prange(nblocks):
        abits = np.empty(n, np.uint32)
        wide = np.empty(n, np.uint64)
        stop = min(rows, (blk + 1) * _ROWS_PER_BLOCK)
        for i in range(blk * _ROWS_PER_BLOCK, stop):
            if not widen_row(ft[i], ft_kind, abits, wide):
                status[i] = _BAD_FT
                continue
            state = row_state(seed, salt, row_offset + np.uint64(i))
            _mark_random(state, k, out[i])
            status[i] = _OK


# ---------------------------------------------------------------------------------------------
# Entry point (the engine reaches it through kenstream.kernels.select)


def _matrix(x, what):
    """(x as [rows, cols] without copying a C-contiguous input, its kind code)."""
    x, kind = as_array(x, what)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x.reshape(1, -1)
    elif x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    return x, kind


def mask_matrix(method, ft, kind, base, base_kind, k, out, *, ties="positions", seed=0, salt=0,
                row_offset=0):
    """Masks of a baseline rule for ``ft`` [rows, cols] (checked inputs) into ``out``.

    ``base`` / ``base_kind`` are used by ``delta`` only (pass ``ft`` / ``kind`` otherwise);
    ``ties`` by ``delta`` and ``magnitude``. Errors name the global row ``row_offset + i``.
    """
    rows, cols = out.shape
    status = np.zeros(rows, dtype=np.uint8)
    if rows == 0 or cols == 0:
        return out
    k_eff = int(min(int(k), cols))
    if method == "random":
        if cols > 1 << 32:
            raise SelectionError(f"random selection supports rows of at most 2**32 columns, got {cols}")
        _random_kernel(words(ft), kind, k_eff, as_u64(seed, "seed"), as_u64(salt, "salt"),
                       as_u64(int(row_offset), "row_offset"), out, status)
    else:
        if ties == "scrambled" and cols > 1 << 32:
            raise SelectionError(f"scrambled ties support rows of at most 2**32 columns, got "
                                 f"{cols}", hint="use --ties positions")
        _rank_kernel(words(ft), kind, words(base), base_kind, method == "delta", k_eff, out,
                     status, TIE_CODES[check_ties(ties)], as_u64(seed, "seed"),
                     as_u64(salt, "salt"), as_u64(int(row_offset), "row_offset"))
    raise_bad_rows(status, row_offset)
    return out


def select_mask_method(method, ft, base=None, k=None, *, ties="positions", seed=0, salt=0,
                       row_offset=0, out=None):
    """Keep ``min(k, cols)`` positions per row of ``ft`` by a baseline rule; return the mask.

    Args:
        method: ``"delta"``, ``"magnitude"`` or ``"random"`` (see the module docstring).
        ft: fine-tuned tensor, any shape (see :mod:`._inputs` for dtypes), viewed as
            ``[rows, cols]`` (first axis by the rest). May be a read-only memmap.
        base: pretrained tensor of ``ft``'s shape (any of the same dtypes); ``delta`` only.
        k: positions to keep per row (int >= 1); ``k >= cols`` keeps every row whole.
        ties: ``delta`` and ``magnitude``: among keys equal to a row's k-th largest,
            ``"positions"`` takes the lowest columns, ``"scrambled"`` the first from a
            column drawn for the row (from seed, salt and row, as KEN's order), wrapping
            around, ``"values"`` all of them (then more than k may be kept).
        seed, salt: ``random`` and scrambled ties; int (taken mod 2**64) or str (hashed).
            Pass a salt per tensor (e.g. its name) so that tensors of one shape get
            different masks.
        row_offset: global index of ``ft``'s first row, for a tensor given in row chunks;
            ``random`` rows depend on ``row_offset + i`` only; also used in error rows.
        out: optional preallocated C-contiguous bool array of ``ft``'s shape to fill.

    Returns:
        bool array of ``ft``'s shape (``out`` when given), exactly ``min(k, cols)`` True per row
        (at least that many with ``ties="values"``).

    Raises:
        SelectionError: unknown method, bad k / dtype / out, or delta without base.
        MismatchError: base and ft shapes differ.
        NonFiniteError: a NaN or Inf in ``ft`` (or ``base`` for delta); ``row`` is the global
            row ``row_offset + i``.

    Cost: O(rows * cols) time (radix select, no sort), O(cols) scratch per block of rows;
    parallel over rows with the current numba thread count.
    """
    if method not in METHODS:
        raise SelectionError(
            f"unknown selection method {method!r}", hint=f"choose one of {', '.join(METHODS)}"
        )
    k = check_k(k)
    row_offset = check_row_offset(row_offset)
    shape = np.shape(ft)
    ft2, kind = _matrix(ft, "fine-tune tensor")
    out = check_out(out, shape)
    base2, base_kind = ft2, kind  # unused unless delta; keeps one compiled signature
    if method == "delta":
        if base is None:
            raise SelectionError("method 'delta' needs the base tensor")
        if np.shape(base) != shape:
            raise MismatchError(
                f"base shape {tuple(np.shape(base))} differs from fine-tune shape {shape}")
        base2, base_kind = _matrix(base, "base tensor")
    mask_matrix(method, ft2, kind, base2, base_kind, k, out.reshape(ft2.shape), ties=ties,
                seed=seed, salt=salt, row_offset=row_offset)
    return out
