"""Per-row preparation for KEN: widening to float32, numpy-exact statistics, grid, sort.

Serial ``@njit`` helpers; the ``_ken`` driver calls them once per row with scratch it
owns. Nothing here allocates.

Input kinds (how a row's storage, read as little-endian uint16 words, is widened):

* ``KIND_F32`` float32 as is; ``KIND_F64`` float64 rounded to nearest float32;
* ``KIND_BF16`` bfloat16 bits (shifted into the top half of a float32);
* ``KIND_F16`` IEEE half bits (decoded exactly; float32 holds every half value).
"""

from __future__ import annotations

import numpy as np

from ._jit import JIT, njit

KIND_F32 = 0
KIND_F64 = 1
KIND_BF16 = 2
KIND_F16 = 3

EXP_MASK = 0x7F800000
RADIX_BITS = 11
RADIX_SIZE = 1 << RADIX_BITS
KEY_MASK = 0xFFFFFFFF  # the key half of a sort item; the top pass must not see positions
WIDE_ROW = 1 << 19  # rows longer than this sort with 8-bit digits (see sort_row)


@njit(**JIT)
def _half_bits_to_single(hb):
    """IEEE binary16 bits -> binary32 bits, exactly (subnormals normalised)."""
    sign = (hb & 0x8000) << 16
    ex = (hb >> 10) & 0x1F
    man = hb & 0x3FF
    if ex == 0x1F:
        return sign | 0x7F800000 | (man << 13)
    if ex != 0:
        return sign | ((ex + 112) << 23) | (man << 13)
    if man == 0:
        return sign
    # Subnormal half: shift the mantissa up until its leading one is the implicit bit.
    e = 113
    while (man & 0x400) == 0:
        man <<= 1
        e -= 1
    return sign | (e << 23) | ((man & 0x3FF) << 13)


@njit(**JIT)
def widen_row(words, kind, bits, wide):
    """Write the float32 bits of one row into ``bits`` (uint32 [n]).

    words: the row's storage as little-endian uint16 words (1, 2 or 4 per value, by
    kind), so that one compiled kernel serves every input dtype. wide: uint64 [n]
    scratch for float64 rows. Returns True if every value is finite (after rounding to
    float32, for float64). Cost: O(n).
    """
    n = bits.shape[0]
    # bad collects the top bit of (exponent field + 1): set only for an all-ones exponent.
    bad = 0
    if kind == KIND_BF16:
        for i in range(n):
            b = np.int64(words[i]) << 16
            bits[i] = b
            bad |= ((b & EXP_MASK) + 0x00800000) >> 31
        return bad == 0
    if kind == KIND_F16:
        for i in range(n):
            b = _half_bits_to_single(np.int64(words[i]))
            bits[i] = b
            bad |= ((b & EXP_MASK) + 0x00800000) >> 31
        return bad == 0
    if kind == KIND_F32:
        for i in range(n):
            bits[i] = np.int64(words[2 * i]) | (np.int64(words[2 * i + 1]) << 16)
    else:
        for i in range(n):
            wide[i] = (np.uint64(words[4 * i]) | (np.uint64(words[4 * i + 1]) << np.uint64(16))
                       | (np.uint64(words[4 * i + 2]) << np.uint64(32))
                       | (np.uint64(words[4 * i + 3]) << np.uint64(48)))
        f64 = wide[:n].view(np.float64)
        f32 = bits.view(np.float32)
        for i in range(n):
            f32[i] = np.float32(f64[i])
    for i in range(n):
        bad |= ((np.int64(bits[i]) & EXP_MASK) + 0x00800000) >> 31
    return bad == 0


@njit(**JIT)
def _block_sum(a, start, n):
    """numpy's float32 sum of a block of n <= 128: eight interleaved accumulators."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(start, start + n):
            res += a[i]
        return res
    r0 = a[start]
    r1 = a[start + 1]
    r2 = a[start + 2]
    r3 = a[start + 3]
    r4 = a[start + 4]
    r5 = a[start + 5]
    r6 = a[start + 6]
    r7 = a[start + 7]
    full = n - n % 8
    for i in range(start + 8, start + full, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(start + full, start + n):
        res += a[i]
    return res


@njit(**JIT)
def pairwise_sum(a, stack, left):
    """numpy's float32 ``add.reduce`` of a [n], bit for bit.

    numpy sums blocks of <= 128 with eight accumulators and splits longer runs in two at
    a multiple of 8, recursively. The recursion is unrolled onto ``stack`` (int64
    [64, 3]: start, length, state) and ``left`` (float32 [64]: finished left halves)
    because numba cannot cache recursive functions. Cost: O(n).
    """
    n = a.shape[0]
    if n <= 128:
        return _block_sum(a, 0, n)
    sp = 0
    stack[0, 0] = 0
    stack[0, 1] = n
    stack[0, 2] = 0
    ret = np.float32(0.0)
    while True:
        s0 = stack[sp, 0]
        ln = stack[sp, 1]
        n2 = ln // 2
        n2 -= n2 % 8
        state = stack[sp, 2]
        if state == 0:  # left half: a leaf now, or a frame whose result arrives in ret
            stack[sp, 2] = 1
            if n2 <= 128:
                ret = _block_sum(a, s0, n2)
            else:
                sp += 1
                stack[sp, 0] = s0
                stack[sp, 1] = n2
                stack[sp, 2] = 0
        elif state == 1:  # ret holds the left half; now the right half
            left[sp] = ret
            stack[sp, 2] = 2
            if ln - n2 <= 128:
                ret = _block_sum(a, s0 + n2, ln - n2)
            else:
                sp += 1
                stack[sp, 0] = s0 + n2
                stack[sp, 1] = ln - n2
                stack[sp, 2] = 0
        else:
            ret = left[sp] + ret
            sp -= 1
            if sp < 0:
                return ret


@njit(**JIT)
def bandwidth(x, scratch, stack, left):
    """KEN bandwidth of float32 row x [n]: float64(float32(1.06) * std(x)) * n**(-1/5).

    ``std`` is numpy's float32 ``np.std`` (ddof 0) reproduced exactly: pairwise mean,
    float32 deviations squared, pairwise sum, float32 divide and sqrt. scratch: float32
    [n]. Returns (h, std); std may be inf/nan when float32 overflows. Cost: O(n).
    """
    n = x.shape[0]
    nf = np.float32(n)
    mean = pairwise_sum(x, stack, left) / nf
    for i in range(n):
        dev = x[i] - mean
        scratch[i] = dev * dev
    var = pairwise_sum(scratch, stack, left) / nf
    s = np.float32(np.sqrt(var))
    h = np.float64(np.float32(1.06) * s) * np.float64(n) ** -0.2
    return h, s


@njit(**JIT)
def make_grid(lo, hi, grid):
    """numpy ``linspace(lo, hi, k)`` on float32 endpoints, into float32 grid [k].

    Returns the float32 step (0 when numpy takes its tiny-step branch: then
    grid[j] = (j / (k-1)) * (hi - lo) + lo). Cost: O(k).
    """
    k = grid.shape[0]
    if k == 1:
        grid[0] = lo
        return np.float32(0.0)
    delta = hi - lo
    div = np.float32(k - 1)
    step = delta / div
    if step == 0:
        for j in range(k):
            grid[j] = ((np.float32(j) / div) * delta) + lo
    else:
        for j in range(k):
            grid[j] = (np.float32(j) * step) + lo
    grid[k - 1] = hi
    return step


@njit(inline="always", **JIT)
def _radix_passes(items, items2, hist, low, digit):
    """Stable LSD radix sort of items [n] by their low 32 bits, ``digit`` bits a pass;
    returns whichever of items and items2 (scratch [n]) holds the result. ``low`` has
    every bit set that is set in some value: lower bits are constant in every key and
    skipped. Inlined, so that a constant ``digit`` folds into the shifts and masks (a
    runtime digit made the sort of a row of 4096 values 1.5x slower)."""
    n = items.shape[0]
    size = 1 << digit
    # Low bits that are zero in every value are constant in every key (ones for
    # negatives, zeros for positives, and the sign bit separates those): skip them.
    shift0 = 0
    while shift0 < 31 and ((low >> shift0) & 1) == 0:
        shift0 += 1
    npass = (32 - shift0 + digit - 1) // digit
    hist[:npass * size] = 0
    for i in range(n):
        it = items[i]
        for p in range(npass):
            hist[p * size + (((it & KEY_MASK) >> (shift0 + p * digit)) & (size - 1))] += 1
    src = items
    dst = items2
    for p in range(npass):
        base = p * size
        sh = shift0 + p * digit
        if hist[base + (((src[0] & KEY_MASK) >> sh) & (size - 1))] == n:
            continue
        total = 0
        for t in range(size):
            c = hist[base + t]
            hist[base + t] = total
            total += c
        for i in range(n):
            it = src[i]
            d = base + (((it & KEY_MASK) >> sh) & (size - 1))
            o = hist[d]
            hist[d] = o + 1
            dst[o] = it
        src, dst = dst, src
    return src


@njit(**JIT)
def sort_row(bits, items, items2, hist, v, pos, a, c):
    """Stable ascending sort of a float32 row given as bits [n] (uint32).

    Writes sorted values v (float32, -0.0 stored as +0.0 so that it ties with 0.0) and
    their places pos (int32) in the order that lists position ``(a * s + c) mod n`` at
    place s (a coprime to n; a = 1, c = 0: places are positions): equal values come out by
    ascending place. LSD radix sort of int64 items ``place << 32 | ordered key`` (one load
    and one store per value and pass); the
    values are decoded back from the sorted keys, so the row is never gathered. Digits
    are 11 bits (at most 3 passes) while the items fit in cache, 8 bits beyond
    ``WIDE_ROW`` values (4 passes, but 256 output streams instead of 2048: on rows of
    10^6 values the wider scatter misses the TLB and the sort ran 2x slower). Skips the
    low bits every key shares (16 for bf16 rows) and passes where every key has the same
    digit. Scratch: items, items2 int64 [n], hist int64 [>= 3 * 2048]. Cost: O(n) per
    pass.
    """
    n = bits.shape[0]
    row = bits
    if a != 1 or c != 0:
        # Gathered first, so that the key loop below stays one straight (vectorised)
        # pass; items2 is free until the radix passes.
        row = items2.view(np.uint32)[:n]
        p = c
        for s in range(n):
            row[s] = bits[p]
            p += a
            if p >= n:
                p -= n
    low = 0
    for i in range(n):
        u = np.int64(row[i])
        if u == 0x80000000:
            u = 0
        # Ordered key: flip every bit of negatives, only the sign bit of positives.
        key = (u ^ 0xFFFFFFFF) if u >= 0x80000000 else (u | 0x80000000)
        items[i] = (np.int64(i) << 32) | key
        low |= u
    if n <= WIDE_ROW:
        done = _radix_passes(items, items2, hist, low, RADIX_BITS)
    else:
        done = _radix_passes(items, items2, hist, low, 8)
    vb = v.view(np.uint32)
    for i in range(n):
        it = done[i]
        pos[i] = it >> 32
        key = it & KEY_MASK
        vb[i] = (key & 0x7FFFFFFF) if key >= 0x80000000 else (key ^ 0xFFFFFFFF)


@njit(**JIT)
def run_bounds(v, gstart, gend):
    """For sorted v [n]: gstart[i] / gend[i] = first / one-past-last index of v[i]'s run
    of equal values. Cost: O(n), two passes."""
    n = v.shape[0]
    if n == 0:
        return
    gstart[0] = 0
    for i in range(1, n):
        gstart[i] = i if v[i] != v[i - 1] else gstart[i - 1]
    gend[n - 1] = n
    for i in range(n - 2, -1, -1):
        gend[i] = i + 1 if v[i] != v[i + 1] else gend[i + 1]
