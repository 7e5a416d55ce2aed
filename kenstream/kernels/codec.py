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

from numba.cpython.unsafe.numbers import leading_zeros
from numba.extending import overload

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

@njit(**JIT)
def _bitlen(z):
    """Bits of the uint64 ``z`` (0 for 0): one count-leading-zeros instruction."""
    return 64 - np.int64(leading_zeros(z))


@njit(**JIT)
def _key_masks(w, is_float):
    """(flip, top, full) of `_zigzag` and `_unzigzag` for width ``w``, as uint64: the
    magnitude bits a negative float's key flips (none for integers), the sign bit's
    position, all ones."""
    full = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - w)
    magnitude = (np.uint64(1) << np.uint64(w - 1)) - np.uint64(1)
    return (magnitude if is_float else np.uint64(0)), np.uint64(w - 1), full


def _group(a):
    """Values of ``a`` whose raw bits one 64-bit chunk holds (see `_group_impl`)."""


@overload(_group)
def _group_impl(a):
    # A constant of the array's type, so each width's loop over a group is unrolled: at
    # most w - 1 raw bits a value, so 8, 4, 2 and 1 values of 8, 16, 32 and 64 bits.
    per = 64 // a.dtype.bitwidth
    return lambda a: per


@njit(**JIT)
def _zigzag(x, y, flip, top, full):
    """zigzag(key(x) - key(y)) for the bits ``x``, ``y`` (uint64) of width ``top + 1``.
    key(x): float patterns with the sign bit set have their magnitude bits flipped, which
    orders them (-0.0 just below +0.0) and is its own inverse."""
    d = ((x ^ (flip * (x >> top))) - (y ^ (flip * (y >> top)))) & full
    return ((d << np.uint64(1)) & full) ^ (full * (d >> top))


@njit(**JIT)
def _unzigzag(z, y, flip, top, full):
    """The bits ``x`` with ``_zigzag(x, y, ...) == z``."""
    d = (z >> np.uint64(1)) ^ (full * (z & np.uint64(1)))
    key = ((y ^ (flip * (y >> top))) + d) & full
    return key ^ (flip * (key >> top))


@njit(**JIT)
def _append(a, p, i, flip, top, full, lengths, chunk, size):
    """Value ``i``: its length stored, its raw bits appended to ``chunk`` of ``size`` bits."""
    v = _zigzag(np.uint64(a[i]), np.uint64(p[i]), flip, top, full)
    length = _bitlen(v)
    lengths[i] = length
    k = max(length - 1, 0)
    low = v & ((np.uint64(1) << np.uint64(k)) - np.uint64(1))
    return chunk | (low << np.uint64(size)), size + k


@njit(**JIT)
def _zigzag_groups(a, p, w, is_float, lengths, chunks, sizes):
    """Each value's length, and for each group of `_group` values their raw bits
    concatenated (first value lowest) in ``chunks[g]``, ``sizes[g]`` bits. No state is
    carried from group to group, so the compiler vectorises it."""
    flip, top, full = _key_masks(w, is_float)
    per = _group(a)
    n = a.shape[0]
    for g in range(n // per):  # whole groups: an inner loop of constant count, unrolled
        chunk, size = np.uint64(0), np.int64(0)
        for j in range(per):
            chunk, size = _append(a, p, g * per + j, flip, top, full, lengths, chunk, size)
        chunks[g], sizes[g] = chunk, size
    if n % per:  # the last, shorter group
        chunk, size = np.uint64(0), np.int64(0)
        for i in range(n - n % per, n):
            chunk, size = _append(a, p, i, flip, top, full, lengths, chunk, size)
        chunks[n // per], sizes[n // per] = chunk, size


@njit(**JIT)
def _write_chunks(chunks, sizes, words):
    """Append each chunk's ``sizes[g]`` bits (at most 63) to ``words`` (uint64); returns the
    bits written. Branch-free: the word in progress is stored at every step, and the
    position moves on when it is full."""
    acc = np.uint64(0)
    nb = np.int64(0)  # bits of acc in use, < 64
    pos = 0
    total = 0
    for g in range(chunks.shape[0]):
        chunk = chunks[g]
        size = np.int64(sizes[g])
        total += size
        acc |= chunk << np.uint64(nb)
        t = nb + size
        words[pos] = acc
        over = t >> 6
        pos += over
        if over:  # nb > 0 here, as size < 64
            acc = chunk >> np.uint64((64 - nb) & 63)
        nb = t - (over << 6)
    if nb > 0:
        words[pos] = acc
    return total


@njit(**JIT)
def encode_lengths(a, p, w, is_float, lengths, words):
    """Lengths ``L`` (uint8 [n]) and raw bits (uint64 ``words``, little-endian bit order)
    of ``a`` against prediction ``p`` (unsigned ints of width ``w``, [n] each).

    ``words`` must hold at least ``n * (w - 1) // 64 + 1`` words. Returns the number of
    raw bits written. Two passes: the per-value arithmetic, which packs each group of a
    few values' raw bits into one 64-bit chunk (vectorised), then the serial writer, one
    step a chunk (docs/benchmarks.md: 0.8 against 2.3 ns a bf16 value for both).
    """
    if words.itemsize != 8:  # uint32 words, as format 2's first writer took, would be misfilled
        raise ValueError("encode_lengths writes uint64 words")
    per = _group(a)
    groups = (a.shape[0] + per - 1) // per
    chunks = np.empty(groups, np.uint64)
    sizes = np.empty(groups, np.uint8)
    _zigzag_groups(a, p, w, is_float, lengths, chunks, sizes)
    return _write_chunks(chunks, sizes, words)


@njit(**JIT)
def _raw_size(lengths, i):
    """Raw bits of value ``i``: its length less the implied top bit."""
    return max(np.int64(lengths[i]) - 1, 0)


@njit(**JIT)
def raw_bits_needed(lengths):
    """Raw bits the lengths call for: sum of max(L - 1, 0)."""
    total = 0
    for i in range(lengths.shape[0]):
        total += _raw_size(lengths, i)
    return total


@njit(**JIT)
def _bits_at(words, off, size):
    """``size`` (< 64) bits of ``words`` (uint64) from bit ``off``; reads the word after."""
    q = off >> 6
    s = np.uint64(off & 63)
    window = (words[q] >> s) | ((words[q + 1] << np.uint64(1)) << (np.uint64(63) - s))
    return window & ((np.uint64(1) << np.uint64(size)) - np.uint64(1))


@njit(**JIT)
def _read_chunks(lengths, words, chunks, out):
    """The inverse of `_write_chunks`: each group of values of ``out``'s width, its raw
    bits as one chunk. Serial (a group starts where the one before ends), one step a
    group."""
    per = _group(out)
    n = lengths.shape[0]
    off = np.int64(0)
    for g in range(n // per):
        size = np.int64(0)
        for j in range(per):
            size += _raw_size(lengths, g * per + j)
        chunks[g] = _bits_at(words, off, size)
        off += size
    if n % per:
        size = np.int64(0)
        for i in range(n - n % per, n):
            size += _raw_size(lengths, i)
        chunks[n // per] = _bits_at(words, off, size)


@njit(**JIT)
def _take(lengths, i, chunk, p, flip, top, full, out):
    """Value ``i`` from the low raw bits of ``chunk`` and prediction ``p[i]`` (the inverse
    of `_append`); returns the chunk's remaining bits."""
    k = np.uint64(_raw_size(lengths, i))
    one = np.uint64(1)
    z = (chunk & ((one << k) - one)) | (np.uint64(lengths[i] > 0) << k)
    out[i] = _unzigzag(z, np.uint64(p[i]), flip, top, full)
    return chunk >> k


@njit(**JIT)
def _split_chunks(lengths, chunks, p, w, is_float, out):
    """Each group's values from its chunk; no state from group to group."""
    per = _group(out)
    flip, top, full = _key_masks(w, is_float)
    n = lengths.shape[0]
    for g in range(n // per):  # an inner loop of constant count, unrolled
        chunk = chunks[g]
        for j in range(per):
            chunk = _take(lengths, g * per + j, chunk, p, flip, top, full, out)
    if n % per:
        chunk = chunks[n // per]
        for i in range(n - n % per, n):
            chunk = _take(lengths, i, chunk, p, flip, top, full, out)


@njit(**JIT)
def decode_lengths(lengths, words, p, w, is_float, out):
    """Inverse of :func:`encode_lengths`: ``out`` [n] (unsigned ints of width ``w``) from
    lengths, raw bits (uint64 ``words``) and the prediction. ``words`` must hold at least
    ``bits // 64 + 2`` words (callers check the raw length against :func:`raw_bits_needed`
    first). Two passes, as the encoder: the serial one cuts the stream into one chunk a
    group, the other splits the chunks (1.1 against 2.3 ms for a 1M-value bf16 frame
    read value by value: docs/benchmarks.md)."""
    if words.itemsize != 8:
        raise ValueError("decode_lengths reads uint64 words")
    per = _group(out)
    chunks = np.empty((lengths.shape[0] + per - 1) // per, np.uint64)
    _read_chunks(lengths, words, chunks, out)
    _split_chunks(lengths, chunks, p, w, is_float, out)


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
    slot = np.empty(n, np.uint16)  # context * slots + length, computed once
    for i in range(n):
        slot[i] = _context(p[i], shift, centre) * slots + np.int64(lengths[i])
    # Four interleaved histograms: no store waits on the load before it.
    hist4 = np.zeros((4, CONTEXTS * slots), np.int64)
    for i in range(n):
        hist4[i & 3, slot[i]] += 1
    hist = hist4.sum(axis=0)
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
    for j in range(n // 2):
        r0 = rank[slot[2 * j]]
        r1 = rank[slot[2 * j + 1]]
        if r0 == ESCAPE:
            escapes[found] = lengths[2 * j]
            found += 1
        if r1 == ESCAPE:
            escapes[found] = lengths[2 * j + 1]
            found += 1
        nibbles[j] = r0 | (r1 << 4)
    if n & 1:
        r0 = rank[slot[n - 1]]
        if r0 == ESCAPE:
            escapes[found] = lengths[n - 1]
            found += 1
        nibbles[n >> 1] = r0
    return found


@njit(**JIT)
def context_unpack(nibbles, escapes, table, p, w, centre, lengths):
    """Inverse of :func:`context_pack`. Returns the number of escapes read, or -1 when a
    symbol names an unused rank, the escapes do not match, or a length exceeds ``w``."""
    n = lengths.shape[0]
    shift = np.uint64(_context_shift(w))
    # The rank table spread over the 256 exponent bytes: one lookup a value.
    lookup = np.empty(256 * RANKS, np.uint8)
    for e in range(256):
        c = _context(np.uint64(e) << shift, shift, centre)
        for r in range(RANKS):
            lookup[e * RANKS + r] = table[c * RANKS + r]
    found = 0
    top = 0
    for i in range(n):  # no branch: vectorised
        r = (np.int64(nibbles[i >> 1]) >> (4 * (i & 1))) & 15
        found += r == ESCAPE
        length = lookup[np.int64((np.uint64(p[i]) >> shift) & np.uint64(255)) * RANKS + r]
        top = max(top, np.int64(length))
        lengths[i] = length  # at ESCAPE: replaced below
    if found != escapes.shape[0]:
        return -1
    if found:
        used = 0
        top = 0
        for i in range(n):
            if (np.int64(nibbles[i >> 1]) >> (4 * (i & 1))) & 15 == ESCAPE:
                lengths[i] = escapes[used]
                used += 1
            top = max(top, np.int64(lengths[i]))
    return found if top <= w else -1


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
def _length_sum(a, p):
    lengths = np.empty(a.shape[0], np.uint8)
    words = np.empty(a.shape[0] // 2 + 1, np.uint64)
    encode_lengths(a, p, 32, True, lengths, words)
    total = 0
    for j in range(a.shape[0]):
        total += np.int64(lengths[j])
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
    if _length_sum(sa, scaled) + m // 64 < _length_sum(sa, sb):
        return s
    return np.float32(1.0)
