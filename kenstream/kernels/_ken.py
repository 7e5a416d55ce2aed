"""KEN row selection kernels: greedy matching of a KDE grid to row values.

One ``prange`` driver (:func:`mask_rows`) writes bool masks for a matrix into a
preallocated output; :func:`positions_row` returns the taken positions of one row in
visiting order. Both run the same serial per-row pipeline:

1. widen the row to float32 (``_rowprep.widen_row``; the only dtype-dependent step, fed
   uint16 words so one compiled kernel serves every dtype), flag non-finite values;
2. sort it (stable radix sort) and find runs of equal values;
3. bandwidth (numpy-exact float32 std), grid (numpy linspace), rounded densities
   (``_density``), visiting order (R descending, then grid index);
4. greedy matching: each grid point takes the free position with the smallest float32
   distance, ties to the lowest position, or, for ``ties="scrambled"``, to the position
   first in a per-row affine order of the positions (``_splitmix.scramble``): the sort
   receives the row in that order, so the matching's "lowest index" is the lowest place
   in it, and the places taken are mapped back to positions at the end.

Per-row cost: O(n) for widening, sort and statistics, O(n P + 16 k P) for the densities
(P ~ 11) plus rare exact sums, O(k alpha(n)) for the matching. Status codes per row:
``OK``, ``NONFINITE`` (a NaN/Inf, after rounding for float64) and ``OVERFLOW`` (the float32
std or range of the row overflows).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from ._density import rounded_density
from ._inputs import SCRAMBLED, VALUES
from ._lattice import MAX_MOMENTS
from ._jit import JIT, PARALLEL, njit, prange
from ._rowprep import (RADIX_SIZE, WIDE_ROW, bandwidth, make_grid, run_bounds, sort_row,
                       widen_row)
from ._splitmix import scramble

OK = 0
NONFINITE = 1
OVERFLOW = 2

Workspace = namedtuple(
    "Workspace",
    "bits wide scratch items items2 hist v pos gstart gend nxt prv taken flag "
    "grid split R acc order ework bwork box_id moments table counts positions stack left",
)


@njit(**JIT)
def make_workspace(n, k):
    """Scratch for one row of n values and k grid points, reused row after row by one
    thread: about 77 n + 720 k bytes, of which a row touches about 64 n (72 n for float64
    rows) and, of the MAX_MOMENTS x (4k + 3) table and the moments, only P x (2L + 1) and
    P per box. (Phases after the sort could reuse the sort buffers' memory, but such
    views ran 20 % slower on matrices and on long rows alike: the arrays stay apart.)"""
    return Workspace(
        np.empty(n, np.uint32),  # bits: the row widened to float32 bits
        np.empty(n, np.uint64),  # wide: float64 rows' bits
        np.empty(n, np.float32),  # scratch: squared deviations for the std
        np.empty(n, np.int64),  # items: radix sort items (place << 32 | key)
        np.empty(n, np.int64),  # items2
        np.empty(3 * RADIX_SIZE, np.int64),  # hist: radix histograms
        np.empty(n, np.float32),  # v: sorted values
        np.empty(n, np.int32),  # pos: their places (positions unless scrambled)
        np.empty(n, np.int32),  # gstart: run of equal values, first index
        np.empty(n, np.int32),  # gend: run end
        np.empty(n + 1, np.int32),  # nxt: union-find, next free
        np.empty(n + 1, np.int32),  # prv: union-find, previous free (+1)
        np.empty(n, np.int32),  # taken: sorted indices taken
        np.zeros(n, np.uint8),  # flag: runs taken (values mode), kept all-zero
        np.empty(k, np.float32),  # grid
        np.empty(k, np.int32),  # split: values below each grid point
        np.empty(k, np.float64),  # R: rounded densities
        np.empty(k, np.float64),  # acc: approximate densities
        np.empty(k, np.int64),  # order: visiting order
        np.empty(n, np.float64),  # ework: box offsets of values
        np.empty(n, np.float64),  # bwork: box of each value
        np.empty(k + 3, np.int64),  # box_id
        np.empty((k + 2, MAX_MOMENTS), np.float64),  # moments per box
        np.empty((MAX_MOMENTS, 4 * k + 3), np.float64),  # table: Hermite x Gaussian
        np.empty(4 * k + 2, np.int64),  # counts: counting sort of R
        np.empty(k, np.int64),  # positions taken, in visiting order
        np.empty((64, 3), np.int64),  # stack: pairwise-sum frames
        np.empty(64, np.float32),  # left: pairwise-sum partial results
    )


@njit(**JIT)
def _find(parent, t):
    """Root of t with path halving: the nearest free slot in this array's direction."""
    while parent[t] != t:
        parent[t] = parent[parent[t]]
        t = parent[t]
    return t


@njit(**JIT)
def visiting_order(R, order, counts):
    """Grid indices by R descending, equal R by ascending index, into order [k].

    Counting sort when R is small (the normal case), else a stable argsort.
    """
    k = R.shape[0]
    top = 0.0
    for j in range(k):
        if R[j] > top:
            top = R[j]
    if top >= counts.shape[0]:
        o = np.argsort(-R, kind="mergesort")
        for j in range(k):
            order[j] = o[j]
        return
    nr = int(top) + 1
    for r in range(nr):
        counts[r] = 0
    for j in range(k):
        counts[int(R[j])] += 1
    start = 0
    for r in range(nr - 1, -1, -1):
        c = counts[r]
        counts[r] = start
        start += c
    for j in range(k):
        r = int(R[j])
        order[counts[r]] = j
        counts[r] += 1


@njit(**JIT)
def _split_points(v, grid, split):
    """split[j] = number of values < grid[j] (two pointers; grid is nearly sorted)."""
    n = v.shape[0]
    p = 0
    for j in range(grid.shape[0]):
        g = grid[j]
        while p > 0 and v[p - 1] >= g:
            p -= 1
        while p < n and v[p] < g:
            p += 1
        split[j] = p


@njit(**JIT)
def match(v, pos, gstart, gend, grid, split, order, nxt, prv, positions, taken):
    """Greedy matching in visiting order; returns how many positions were taken.

    ``pos`` holds each sorted value's place (its position, or its place in a scrambled
    order); equal distances go to the lowest place, and places are what ``positions``
    receives. Free sorted indices are kept as two union-find arrays: nxt[i] leads to the first
    free index >= i (n: none), prv[i + 1] to the last free index <= i (stored + 1, 0:
    none). Float32 distance is monotone on each side of g, so the free values at the
    smallest distance on one side form a run of free entries, walked run of equal
    values by run of equal values; within a run of equal values the first free entry
    has the lowest place (the sort is stable). Cost: O(k alpha(n)) plus the length of
    distance-tie runs.
    """
    n = v.shape[0]
    for t in range(n + 1):
        nxt[t] = t
        prv[t] = t
    count = 0
    for q in range(order.shape[0]):
        if count == n:
            break
        j = order[q]
        g = grid[j]
        s = split[j]
        best = -1
        bestpos = 0
        bestd = np.float32(0.0)
        r = _find(nxt, s)
        if r < n:
            bestd = abs(v[r] - g)
            best = r
            bestpos = pos[r]
            t = _find(nxt, gend[r])
            while t < n and abs(v[t] - g) == bestd:
                if pos[t] < bestpos:
                    best = t
                    bestpos = pos[t]
                t = _find(nxt, gend[t])
        tl = _find(prv, s)
        if tl > 0:
            l = tl - 1
            dl = abs(v[l] - g)
            if best < 0 or dl <= bestd:
                if best >= 0 and dl < bestd:
                    best = -1
                while True:
                    c = _find(nxt, gstart[l])
                    if best < 0 or pos[c] < bestpos:
                        best = c
                        bestpos = pos[c]
                    tl = _find(prv, gstart[l])
                    if tl == 0:
                        break
                    l = tl - 1
                    if abs(v[l] - g) != dl:
                        break
        nxt[best] = best + 1
        prv[best + 1] = best
        positions[count] = bestpos
        taken[count] = best
        count += 1
    return count


@njit(**JIT)
def select_widened(n, k, ws, mode, a, c):
    """Run the pipeline on the row already widened into ws.bits [n]; returns (status,
    number of positions taken, number of exact density sums).

    Equal distances go to the lowest place in the order listing position (a s + c) mod n
    at place s (a = 1, c = 0: the lowest position). The taken positions (visiting order)
    are in ws.positions, their sorted indices in ws.taken (ws.pos holds places). Needs ws
    made for this row length and a grid of k points. Takes no input-dtype argument, so it
    compiles once for every dtype.
    """
    if n == 0:
        return OK, 0, 0
    bits = ws.bits[:n]
    v = ws.v
    sort_row(bits, ws.items, ws.items2, ws.hist, v, ws.pos, a, c)
    run_bounds(v, ws.gstart, ws.gend)
    h, s = bandwidth(bits.view(np.float32), ws.scratch, ws.stack, ws.left)
    lo = v[0]
    hi = v[n - 1]
    if not np.isfinite(s) or not np.isfinite(hi - lo):
        return OVERFLOW, 0, 0
    grid = ws.grid[:k]
    R = ws.R[:k]
    step = make_grid(lo, hi, grid)
    exact = 0
    if k == 1 or h == 0.0:
        # No spread: every density is taken as 0, so grid points go in grid order.
        R[:] = 0.0
    else:
        exact = rounded_density(v, ws.gend, grid, lo, step, h, R, ws.acc[:k], ws.ework,
                                ws.bwork, ws.box_id, ws.moments, ws.table, mode)
    order = ws.order[:k]
    visiting_order(R, order, ws.counts)
    split = ws.split[:k]
    _split_points(v, grid, split)
    count = match(v, ws.pos, ws.gstart, ws.gend, grid, split, order, ws.nxt, ws.prv,
                  ws.positions, ws.taken)
    if a != 1 or c != 0:
        positions = ws.positions
        for t in range(count):
            positions[t] = (a * positions[t] + c) % n
    return OK, count, exact


@njit(**JIT)
def mask_widened(n, k, values, finite, ws, out, a, c):
    """Write the KEN mask of the row widened into ws.bits into out (bool [n]); returns
    the status code. values=False keeps the taken positions (ties by the order (a, c));
    values=True keeps every position whose value equals a taken value (0.0 == -0.0; needs
    a = 1, c = 0)."""
    if not finite:
        return NONFINITE
    if k >= n:
        out[:] = True
        return OK
    status, count, _ = select_widened(n, k, ws, 0, a, c)
    if status != OK:
        return status
    out[:] = False
    if not values:
        for c in range(count):
            out[ws.positions[c]] = True
        return OK
    flag = ws.flag
    gstart = ws.gstart
    for c in range(count):
        flag[gstart[ws.taken[c]]] = 1
    for i in range(n):
        if flag[gstart[i]]:
            out[ws.pos[i]] = True
    for c in range(count):
        flag[gstart[ws.taken[c]]] = 0
    return OK


@njit(**JIT)
def mask_row(words, kind, k, ties, ws, out, seed, salt, row):
    """Widen one row (uint16 words) into ws and write its mask into out (bool [n]) in tie
    mode ``ties`` (a code); row is its global number (uint64), which with seed and salt
    (uint64) draws the scrambled order. Returns the row's status code."""
    n = out.shape[0]
    finite = widen_row(words, kind, ws.bits, ws.wide)
    a, c = scramble(n, seed, salt, row) if ties == SCRAMBLED else (np.int64(1), np.int64(0))
    return mask_widened(n, k, ties == VALUES, finite, ws, out, a, c)


@njit(**PARALLEL)
def mask_rows(words, kind, k, ties, out, status, nblocks, seed, salt, row_offset):
    """KEN masks of every row of a matrix [rows, n] into out (bool [rows, n]).

    words: the matrix as uint16 words [rows, n * words-per-value] (see
    ``_rowprep.widen_row``); out is preallocated. ties: a tie-mode code; row i is global
    row ``row_offset + i`` (seed, salt, row_offset uint64, see :func:`mask_row`).
    status (uint8 [rows]) gets each row's code. Rows are split into ``nblocks``
    contiguous blocks (a few per thread), one workspace per block; a row's result does
    not depend on its block or on the thread count. Cost: rows * per-row cost / threads.
    """
    rows = out.shape[0]
    n = out.shape[1]
    if rows == 0:
        return
    nblocks = max(1, min(rows, nblocks))
    kw = k if k < n else 1
    for b in prange(nblocks):
        r0 = b * rows // nblocks
        r1 = (b + 1) * rows // nblocks
        ws = make_workspace(n, kw)
        for i in range(r0, r1):
            status[i] = mask_row(words[i], kind, k, ties, ws, out[i], seed, salt,
                                 row_offset + np.uint64(i))


def numpy_workspace(n, k):
    """The workspace of :func:`make_workspace` for rows of n values and k grid points,
    allocated by NumPy in Python: NumPy asks the kernel for huge pages on allocations of
    4 MB or more (madvise), numba's allocator does not. A single long row faults in its
    whole workspace; with 4 KB pages that was a third of its time (rows of 10^6 values:
    ~75 ns a value against ~56 with huge pages, on the development machine)."""
    return make_workspace.py_func(n, k if k < n else 1)


@njit(**JIT)
def mask_rows_with(words, kind, k, ties, out, status, ws, seed, salt, row_offset):
    """:func:`mask_rows` on the calling thread, with the caller's workspace ws (made for
    this n and k, e.g. by :func:`numpy_workspace`)."""
    for i in range(out.shape[0]):
        status[i] = mask_row(words[i], kind, k, ties, ws, out[i], seed, salt,
                             row_offset + np.uint64(i))


@njit(**JIT)
def positions_row(words, n, kind, k, mode, a=1, c=0):
    """(status, positions int64 [min(k, n)], exact density sums) of one row of n values
    given as uint16 words; positions in visiting order, ties by the order (a, c) of
    :func:`select_widened` (default: the lowest position).

    mode: density path (0 automatic; 1 exact sums, 2 lattice: for tests)."""
    ws = make_workspace(n, max(k, 1))
    if not widen_row(words, kind, ws.bits, ws.wide):
        return NONFINITE, np.zeros(0, np.int64), 0
    status, count, exact = select_widened(n, k, ws, mode, np.int64(a), np.int64(c))
    return status, ws.positions[:count].copy(), exact
