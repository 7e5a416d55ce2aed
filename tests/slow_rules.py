"""Slow NumPy twins of the baseline selection rules, written from their definitions
(docs/algorithm.md): tests compare the kernels and the engine's output with these."""

from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1


def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; inputs are finite."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def widen(a):
    """The float32 values a row of ``a`` stands for (uint16 = bfloat16 bit patterns)."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def cast(x32, dtype):
    if dtype == "bfloat16":
        return to_bf16_bits(x32)
    return x32.astype(dtype)


def rotation_ranks(n: int, seed: int, salt: int, row: int) -> np.ndarray:
    """rank[p] of every position p in the rotated order of global row ``row``: position
    (c + s) mod n at place s, with c the first draw of the row's stream, uniform in [0, n)
    (c = 0 for n < 2)."""
    c = row_stream(seed, salt, row)(n) if n >= 2 else 0
    return (np.arange(n, dtype=np.int64) - c) % max(n, 1)


def slow_top(keys, k, ties="positions", seed=0, salt=0, row0=0):
    """Per row: the k largest keys via a full lexsort; equal keys to the lowest position,
    to the lowest place in row ``row0 + i``'s rotated order (``scrambled``), or, for
    ``values``, every key equal to the k-th largest too."""
    keys = np.asarray(keys)
    mask = np.zeros(keys.shape, bool)
    cols = keys.shape[1]
    for i in range(keys.shape[0]):
        second = rotation_ranks(cols, seed, salt, row0 + i) if ties == "scrambled" \
            else np.arange(cols)
        order = np.lexsort((second, -keys[i].astype(np.float64)))
        top = order[: min(k, cols)]
        mask[i, top] = True
        if ties == "values" and len(top):
            mask[i, keys[i] == keys[i][top[-1]]] = True
    return mask


def slow_delta(ft, base, k, ties="positions", **draw):
    with np.errstate(over="ignore"):  # huge opposite values overflow to inf, a valid key
        return slow_top(np.abs(widen(ft) - widen(base)), k, ties, **draw)


def slow_magnitude(ft, k, ties="positions", **draw):
    return slow_top(np.abs(widen(ft)), k, ties, **draw)


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def row_stream(seed, salt, row):
    """The documented stream of a row: splitmix64 seeded by mix(mix(mix(seed) ^ salt) ^ row);
    returns below(s), Lemire bounded integers in [0, s) from the high 32 bits."""
    state = mix64(mix64(mix64(seed & M64) ^ (salt & M64)) ^ (row & M64))

    def below(s):
        nonlocal state
        while True:
            m = (mix64(state) >> 32) * s
            state = (state + 0x9E3779B97F4A7C15) & M64
            if (m & 0xFFFFFFFF) >= ((1 << 32) - s) % s:
                return m >> 32

    return below


def slow_random_row(seed, salt, row, n, k):
    """Floyd's sampling from the row's stream."""
    below = row_stream(seed, salt, row)
    chosen = set()
    if k >= n:
        chosen = set(range(n))
    else:
        for j in range(n - k, n):
            t = below(j + 1)
            chosen.add(j if t in chosen else t)
    mask = np.zeros(n, bool)
    mask[list(chosen)] = True
    return mask


def scrambled_ranks(n: int, seed: int, salt: int, row: int) -> np.ndarray:
    """rank[p] of every position p in the scrambled order of global row ``row``: the order
    lists position (a * s + c) mod n at place s, c uniform in [0, n) and then a uniform in
    [1, n) redrawn until gcd(a, n) = 1, both from the row's splitmix64 stream (a = 1 for
    n <= 2; c = 0 for n < 2)."""
    a, c = 1, 0
    if n >= 2:
        below = row_stream(seed, salt, row)
        c = below(n)
        if n > 2:
            a = 1 + below(n - 1)
            while math.gcd(a, n) != 1:
                a = 1 + below(n - 1)
    order = (a * np.arange(n, dtype=np.int64) + c) % n
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank
