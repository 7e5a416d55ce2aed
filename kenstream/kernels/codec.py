"""Numba kernels of format 2's value coding: fine-tuned values coded against a prediction.

For each value, with ``a`` the fine-tuned bits and ``p`` the predicted bits (the base
value, or for float32 the base times a per-frame scale), all as unsigned integers of
the dtype's width ``w``:

1. ``key`` maps bits to an order-preserving integer: float sign-magnitude patterns to
   two's complement (``-0.0`` just below ``+0.0``, so the map is a bijection); integer
   dtypes are used as they are;
2. ``d = key(a) - key(p)`` modulo ``2**w``, read as a signed ``w``-bit number, and
   ``z = zigzag(d)`` (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...);
3. ``L`` = the bit length of ``z`` (0 when a equals the prediction), and the ``L - 1``
   bits of ``z`` below its top bit, which are appended raw to a little-endian bit
   stream (the top bit is implied by ``L``).

``L`` carries almost all the redundancy; :func:`context_pack` turns it into 4-bit
symbols (its rank among the lengths seen in the same *context*, the exponent of the
prediction relative to the frame's median exponent) for the entropy coder. Every kernel
is serial and ``nogil``, so frames are coded on several threads at once. NumPy arrays
in and out, no I/O. Cost: O(n) per kernel.
"""

from __future__ import annotations

import numpy as np

from ._jit import JIT, njit

CONTEXTS = 8
"""Exponent contexts of the length stream (the prediction's exponent minus the frame's
median exponent, plus 4, clipped to 0..7)."""
RANKS = 16
"""Symbols per context: ranks 0..14 name a length; 15 (``ESCAPE``) says the length is in
the escape stream."""
ESCAPE = 15
UNUSED = 255
"""Rank-table entry of a rank no length was given."""
MAX_WIDTH = 64

_BITLEN16 = np.array([int(i).bit_length() for i in range(1 << 16)], dtype=np.uint8)


@njit(**JIT)
def _bitlen(z):
    n = 0
    if z >> np.uint64(32):
        n += 32
        z >>= np.uint64(32)
    if z >> np.uint64(16):
        n += 16
        z >>= np.uint64(16)
    return n + np.int64(_BITLEN16[np.int64(z)])


@njit(**JIT)
def _masks(w):
    """(sign bit, magnitude mask, all-ones) of width ``w`` as uint64."""
    full = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - w)
    sign = np.uint64(1) << np.uint64(w - 1)
    return sign, sign - np.uint64(1), full


@njit(**JIT)
def _key(x, is_float, sign, mag, full):
    if is_float and (x & sign):
        return (~(x & mag)) & full
    return x


@njit(**JIT)
def _unkey(k, is_float, sign, full):
    if is_float and (k & sign):
        return ((~k) & full) | sign
    return k


@njit(**JIT)
def encode_lengths(a, p, w, is_float, lengths, words):
    """Lengths ``L`` (uint8 [n]) and raw bits (uint32 words, little-endian bit order) of
    ``a`` against prediction ``p`` (unsigned ints of width ``w``, [n] each).

    ``words`` must hold at least ``ceil(n * (w - 1) / 32) + 1`` words. Returns the number
    of raw bits written.
    """
    sign, mag, full = _masks(w)
    acc = np.uint64(0)
    nb = 0
    pos = 0
    total = 0
    for i in range(a.shape[0]):
        d = (_key(np.uint64(a[i]), is_float, sign, mag, full)
             - _key(np.uint64(p[i]), is_float, sign, mag, full)) & full
        z = ((d << np.uint64(1)) & full) ^ (full if d & sign else np.uint64(0))
        n = _bitlen(z)
        lengths[i] = n
        k = n - 1
        if k > 0:
            total += k
            while k > 0:
                take = min(k, 32)
                acc |= (z & ((np.uint64(1) << np.uint64(take)) - np.uint64(1))) << np.uint64(nb)
                z >>= np.uint64(take)
                nb += take
                k -= take
                if nb >= 32:
                    words[pos] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                    pos += 1
                    acc >>= np.uint64(32)
                    nb -= 32
    if nb > 0:
        words[pos] = np.uint32(acc & np.uint64(0xFFFFFFFF))
    return total


@njit(**JIT)
def raw_bits_needed(lengths):
    """Raw bits the lengths call for: sum of max(L - 1, 0)."""
    total = 0
    for i in range(lengths.shape[0]):
        if lengths[i] > 1:
            total += np.int64(lengths[i]) - 1
    return total


@njit(**JIT)
def decode_lengths(lengths, words, p, w, is_float, out):
    """Inverse of :func:`encode_lengths`: ``out`` [n] (unsigned ints of width ``w``) from
    lengths, raw bits and the prediction. ``words`` must hold every raw bit plus one
    spare word (callers check the raw length against :func:`raw_bits_needed` first)."""
    sign, mag, full = _masks(w)
    acc = np.uint64(0)
    nb = 0
    pos = 0
    for i in range(lengths.shape[0]):
        n = np.int64(lengths[i])
        if n <= 1:
            z = np.uint64(n)
        else:
            k = n - 1
            z = np.uint64(0)
            got = 0
            while got < k:
                if nb == 0:
                    acc = np.uint64(words[pos])
                    pos += 1
                    nb = 32
                take = min(k - got, nb)
                z |= (acc & ((np.uint64(1) << np.uint64(take)) - np.uint64(1))) << np.uint64(got)
                acc >>= np.uint64(take)
                nb -= take
                got += take
            z |= np.uint64(1) << np.uint64(k)
        d = (z >> np.uint64(1)) ^ (full if z & np.uint64(1) else np.uint64(0))
        kp = _key(np.uint64(p[i]), is_float, sign, mag, full)
        out[i] = _unkey((kp + d) & full, is_float, sign, full)


@njit(**JIT)
def _context_shift(w):
    return w - 9 if w >= 16 else 3


@njit(**JIT)
def median_exponent(p, w):
    """Median of ``(p >> shift) & 255`` over at most ~4096 evenly spaced values: the
    frame's typical exponent, the centre of the length contexts."""
    n = p.shape[0]
    if n == 0:
        return 0
    step = max(1, n // 4096)
    shift = np.uint64(_context_shift(w))
    hist = np.zeros(256, np.int64)
    count = 0
    for j in range(0, n, step):
        hist[np.int64((np.uint64(p[j]) >> shift) & np.uint64(255))] += 1
        count += 1
    acc = 0
    for e in range(256):
        acc += hist[e]
        if acc * 2 >= count:
            return e
    return 255


@njit(**JIT)
def _context(x, shift, centre):
    c = np.int64((np.uint64(x) >> shift) & np.uint64(255)) - centre + 4
    return 0 if c < 0 else (CONTEXTS - 1 if c > CONTEXTS - 1 else c)


@njit(**JIT)
def context_pack(lengths, p, w, centre, table, nibbles, escapes):
    """Symbols of the lengths: per context, lengths ranked by frequency (ties to the
    shorter length), ranks 0..14 as 4-bit symbols two to a byte (first in the low half),
    rank 15 with the length itself in ``escapes``.

    Writes ``table`` (uint8 [CONTEXTS * RANKS], rank -> length, UNUSED where none),
    ``nibbles`` (uint8, at least ceil(n / 2)) and ``escapes`` (uint8 [n]); returns the
    number of escapes.
    """
    n = lengths.shape[0]
    shift = np.uint64(_context_shift(w))
    slots = MAX_WIDTH + 1
    hist = np.zeros(CONTEXTS * slots, np.int64)
    for i in range(n):
        hist[_context(p[i], shift, centre) * slots + np.int64(lengths[i])] += 1
    rank = np.full(CONTEXTS * slots, ESCAPE, np.uint8)
    for c in range(CONTEXTS):
        order = np.argsort(-hist[c * slots:(c + 1) * slots], kind="mergesort")
        for r in range(RANKS):
            table[c * RANKS + r] = UNUSED
        for r in range(ESCAPE):
            length = order[r]
            if hist[c * slots + length] > 0:
                rank[c * slots + length] = r
                table[c * RANKS + r] = length
    found = 0
    for i in range(n):
        length = np.int64(lengths[i])
        r = rank[_context(p[i], shift, centre) * slots + length]
        if r == ESCAPE:
            escapes[found] = length
            found += 1
        if i & 1:
            nibbles[i >> 1] |= r << 4
        else:
            nibbles[i >> 1] = r
    return found


@njit(**JIT)
def context_unpack(nibbles, escapes, table, p, w, centre, lengths):
    """Inverse of :func:`context_pack`. Returns the number of escapes read, or -1 when a
    symbol names an unused rank, the escapes run out, or a length exceeds ``w``."""
    n = lengths.shape[0]
    shift = np.uint64(_context_shift(w))
    found = 0
    for i in range(n):
        r = (np.int64(nibbles[i >> 1]) >> (4 * (i & 1))) & 15
        if r == ESCAPE:
            if found >= escapes.shape[0]:
                return -1
            length = np.int64(escapes[found])
            found += 1
        else:
            length = np.int64(table[_context(p[i], shift, centre) * RANKS + r])
        if length > w:
            return -1
        lengths[i] = length
    return found


SCALE_RANGE = (0.5, 2.0)
"""A fitted scale outside this range is not used."""


@njit(**JIT)
def scale_f32(b, s, out):
    """Prediction bits ``out`` [n] (uint32) of float32 bits ``b`` scaled by ``s``.

    Only normal values far from the subnormal and overflow ranges (biased exponent 2 to
    253) are multiplied, ``float32(b) * s`` rounded to nearest even; the rest are copied.
    With ``s`` in `SCALE_RANGE` every product then has normal inputs and a normal result,
    so it is the same on any IEEE machine, whatever its flush-to-zero or NaN settings.
    """
    bf = b.view(np.float32)
    of = out.view(np.float32)
    for i in range(b.shape[0]):
        e = (np.uint32(b[i]) >> np.uint32(23)) & np.uint32(255)
        if e >= 2 and e <= 253:
            of[i] = bf[i] * s
        else:
            out[i] = b[i]


@njit(**JIT)
def _length_sum(a, p, sign, mag, full):
    total = 0
    for j in range(a.shape[0]):
        d = (_key(np.uint64(a[j]), True, sign, mag, full)
             - _key(np.uint64(p[j]), True, sign, mag, full)) & full
        z = ((d << np.uint64(1)) & full) ^ (full if d & sign else np.uint64(0))
        total += _bitlen(z)
    return total


@njit(**JIT)
def fit_scale(a, b):
    """A float32 factor ``s`` with ``a ~ b * s`` for float32 bits ``a``, ``b`` (weight
    decay shrinks every untouched weight by one factor), or 1.0 when scaling saves no
    bits. The median ratio over at most ~16384 evenly spaced finite pairs, kept only if
    it shortens the coded lengths of that sample. O(n / step) work."""
    n = a.shape[0]
    step = max(1, n // 16384)
    m = (n + step - 1) // step
    sa = np.empty(m, np.uint32)
    sb = np.empty(m, np.uint32)
    for j in range(m):
        sa[j] = a[j * step]
        sb[j] = b[j * step]
    fa = sa.view(np.float32)
    fb = sb.view(np.float32)
    ratios = np.empty(m, np.float64)
    k = 0
    for j in range(m):
        if fb[j] != 0 and np.isfinite(fb[j]) and np.isfinite(fa[j]):
            ratios[k] = np.float64(fa[j]) / np.float64(fb[j])
            k += 1
    if k == 0:
        return np.float32(1.0)
    s = np.float32(np.median(ratios[:k]))
    if not (s >= np.float32(SCALE_RANGE[0]) and s <= np.float32(SCALE_RANGE[1])) \
            or s == np.float32(1.0):
        return np.float32(1.0)
    scaled = np.empty(m, np.uint32)
    scale_f32(sb, s, scaled)
    sign, mag, full = _masks(32)
    if _length_sum(sa, scaled, sign, mag, full) + m // 64 < _length_sum(sa, sb, sign, mag, full):
        return s
    return np.float32(1.0)
