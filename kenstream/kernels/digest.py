"""Content digests of base tensors (docs/format.md 6.7): what a format 2 record says its
base rows hold, checked wherever a reader takes values from the base.

The digest of rows ``r0 .. r1`` of a ``[rows, cols]`` tensor is a sum, modulo 2^64, of one
term a 64-bit word: each row's little-endian bytes, zero-padded to a multiple of 8, are
words ``0 .. W - 1`` (``W = ceil(cols * itemsize / 8)``), word ``k`` of row ``r`` has index
``i = r * W + k``, and its term is ``mix64(word ^ (i * GAMMA))`` (splitmix64's finaliser).
A sum does not depend on the order of its terms, so blocks of rows are digested anywhere
(on threads, in frames, on other machines) and added. One changed word always changes
its term (the finaliser is a bijection); more changes cancel with odds of about 2^-64.
It detects another revision or a damaged copy of a base, not a forgery.
"""

from __future__ import annotations

import threading

import numpy as np

from ._jit import PARALLEL, njit, prange
from ._splitmix import GAMMA, mix64


@njit(**PARALLEL)
def _digest_words(words, first):
    """Sum of the terms of ``words`` [n, W] (uint64) whose first word has index ``first``."""
    n, w = words.shape
    total = np.uint64(0)
    for i in prange(n):
        acc = np.uint64(0)
        start = np.uint64(first) + np.uint64(i) * np.uint64(w)
        for k in range(w):
            acc += mix64(words[i, k] ^ ((start + np.uint64(k)) * GAMMA))
        total += acc
    return total


def rows_digest(rows: np.ndarray, row0: int) -> int:
    """The digest of ``rows`` ([n, cols], any dtype), rows ``row0 .. row0 + n`` of their
    tensor. O(n * cols), parallel over rows; copies only when a row's bytes are not a
    multiple of 8 (to pad it) or ``rows`` is not C-contiguous."""
    n = rows.shape[0]
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    width = raw.shape[1]
    w = -(-width // 8)
    if width != 8 * w:
        padded = np.zeros((n, 8 * w), np.uint8)
        padded[:, :width] = raw
        raw = padded
    if n == 0 or w == 0:
        return 0
    return int(_digest_words(raw.view("<u8"), np.uint64(row0 * w)))


def add(a: int, b: int) -> int:
    """Two digests of disjoint rows of one tensor, combined."""
    return (a + b) & 0xFFFFFFFFFFFFFFFF


class Digest:
    """A tensor's digest gathered block by block, in any order, from any thread that
    calls `add`; each row must be added once."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, rows: np.ndarray, row0: int) -> None:
        d = rows_digest(rows, row0)  # outside the lock: the kernel runs without the GIL
        with self._lock:
            self.value = add(self.value, d)
