"""splitmix64 streams (Steele, Lea & Flood 2014) for the rules that draw per row.

A counter-based stream: any row's draws are regenerated from ``(seed, salt, row)`` alone,
so a mask never depends on the thread count or on how a tensor is cut into row blocks.
Used by the ``random`` baseline (Floyd's sampling), by KEN's ``scrambled`` ties (an affine
permutation of the row's positions) and by the ranking rules' (a rotation of the row).
Serial ``@njit`` helpers on uint64.
"""

from __future__ import annotations

import numpy as np

from ._jit import JIT, njit

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)


@njit(**JIT)
def mix64(z):
    """splitmix64's finaliser of ``z + gamma`` (uint64 -> uint64)."""
    z = z + GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(**JIT)
def row_state(seed, salt, row):
    """Initial stream state of global row ``row``: mix(mix(mix(seed) ^ salt) ^ row)."""
    return mix64(mix64(mix64(seed) ^ salt) ^ row)


@njit(**JIT)
def below(state, s):
    """(new state, uniform integer in [0, s)) for 1 <= s <= 2**32, without modulo bias.

    Lemire's multiply-shift on the high 32 bits of one splitmix64 output per try; the
    output is mix64(state) and the state then advances by gamma.
    """
    m = (mix64(state) >> np.uint64(32)) * s
    state = state + GAMMA
    low = m & _LOW32
    if low < s:
        floor = ((_LOW32 + np.uint64(1)) - s) % s
        while low < floor:
            m = (mix64(state) >> np.uint64(32)) * s
            state = state + GAMMA
            low = m & _LOW32
    return state, m >> np.uint64(32)


@njit(**JIT)
def _first_place(n, seed, salt, row):
    """(stream state after it, c): the row's first draw, uniform in [0, n), 2 <= n <= 2**32;
    the offset of both the scrambled and the rotated order."""
    state, c = below(row_state(seed, salt, row), np.uint64(n))
    return state, np.int64(c)


@njit(**JIT)
def scramble(n, seed, salt, row):
    """(a, c) of the scrambled order of a row of n positions, drawn from the row's stream.

    The order lists position ``(a * s + c) mod n`` at place s = 0 .. n-1: with a coprime
    to n it is a bijection. c is uniform in [0, n); a is uniform in [1, n), drawn again
    until gcd(a, n) = 1 (a = 1 when n <= 2). Returns int64s; (1, 0) is the identity.
    Cost: a few draws (n / phi(n) tries for a, under 4 for n < 2**31).
    """
    if n < 2:
        return np.int64(1), np.int64(0)
    state, c = _first_place(n, seed, salt, row)
    a = np.int64(1)
    if n > 2:
        while True:
            state, t = below(state, np.uint64(n - 1))
            a = np.int64(t) + 1
            x = a
            y = np.int64(n)
            while y != 0:
                x, y = y, x % y
            if x == 1:
                break
    return a, c


@njit(**JIT)
def rotation(n, seed, salt, row):
    """The first place ``c`` of the row's rotated order, which lists position
    ``(c + s) mod n`` at place s: the ``c`` of `scramble`, 0 for n < 2. For rows of at
    most 2**32 positions (``below``)."""
    if n < 2:
        return np.int64(0)
    return _first_place(n, seed, salt, row)[1]
