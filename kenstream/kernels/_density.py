"""Rounded Gaussian KDE densities at the grid points (the visiting-order keys of KEN).

KEN needs only ``R(g) = round_half_even(D(g))`` with

    D(g) = 1 / (n h sqrt(2 pi)) * sum_i exp(-((g - x_i) / h)**2 / 2)        (float64)

at the k grid points. The plain sum costs n*k exps per row; here most ``R`` come from a
cheap approximation ``D~`` with a rigorous absolute error bound ``eps``: when
``|D~ - round(D~)| < 0.5 - eps`` the true D rounds to the same integer. So the result is
the rounding of the float64 sum, not of an approximation (see docs/algorithm.md).

Three tiers (:mod:`._lattice` computes the first two): the lattice approximation decides
nearly every grid point at once; a grid point it leaves undecided gets the point
evaluation, whose bound follows D(g) rather than the row's peak; one still within its
bound of a ``.5`` boundary gets the exact float64 sum. The exact sum costs O(values
within 9 h), up to half the row, so the middle tier keeps long rows linear: without it
their undecided points grow faster than k (the tier-1 bound grows with n) and each costs
O(n).

All functions are serial ``@njit`` helpers called once per row from the ``_ken`` driver;
they take sorted float32 values ``v`` (ascending, -0.0 stored as +0.0) and ``gend``
(``gend[i]`` = end of the run of values equal to ``v[i]``) and write float64 ``R``.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import JIT, njit
from ._lattice import (EXACT_REACH, MAX_EPS, SQRT_2PI, lattice_density, lattice_plan,
                       lower_bound, point_density)

# Relative costs used to pick a method: one exp vs one vectorised multiply-add.
COST_EXP = 1.0
COST_FMA = 0.06


@njit(**JIT)
def round_half_even(x):
    """numpy's ``np.round`` of one float64 (ties to even)."""
    r = np.floor(x)  # math.floor would return an int64 and overflow past 2**63
    d = x - r  # exact for float64
    if d > 0.5 or (d == 0.5 and r % 2.0 != 0.0):
        r += 1.0
    return r


@njit(**JIT)
def exact_density(v, gend, g, h):
    """D(g) as the float64 sum over values within 9 h of g; one exp per distinct value.

    Cost: O(log n + number of distinct values within 9 h).
    """
    n = v.shape[0]
    g64 = np.float64(g)
    i = lower_bound(v, g64 - EXACT_REACH * h, 0, n)
    stop = lower_bound(v, g64 + EXACT_REACH * h, i, n)
    # A run of equal values never straddles `stop`, so whole runs are summed.
    s = 0.0
    while i < stop:
        e = gend[i]
        u = (g64 - np.float64(v[i])) / h
        s += (e - i) * math.exp(-(u * u) / 2.0)
        i = e
    return s / (n * h * SQRT_2PI)


@njit(**JIT)
def _direct(v, gend, grid, h, R):
    for j in range(grid.shape[0]):
        R[j] = round_half_even(exact_density(v, gend, grid[j], h))
    return grid.shape[0]


@njit(**JIT)
def _direct_cost(v, grid, h):
    """Estimated total number of values within 9 h of the grid points (the exact path's
    work), from about 64 sampled grid points. Cost: O(64 log n)."""
    n = v.shape[0]
    k = grid.shape[0]
    stride = max(1, k // 64)
    total = 0
    count = 0
    for j in range(0, k, stride):
        g = np.float64(grid[j])
        a = lower_bound(v, g - EXACT_REACH * h, 0, n)
        total += lower_bound(v, g + EXACT_REACH * h, a, n) - a
        count += 1
    return total * (k / count)


@njit(**JIT)
def rounded_density(v, gend, grid, lo, step, h, R, acc, ework, bwork, box_id, moments,
                    table, mode):
    """Write R[j] = round(D(grid[j])) for every grid point; return how many exact sums ran.

    v, gend: sorted float32 values [n] and run ends (int32); grid: float32 [k];
    lo, step: float32 lattice origin and spacing of the grid (step > 0 for the lattice
    path); h > 0 finite. Scratch: acc float64 [k], ework, bwork float64 [n], box_id
    int64 [>= k + 3], moments float64 [>= k + 2, MAX_MOMENTS], table float64
    [MAX_MOMENTS, >= 4k + 3]. mode: 0 picks the cheaper path, 1 forces exact sums,
    2 forces the lattice wherever it applies (the last two for tests).
    Cost: O(n P + 16 k P) for the lattice path (P ~ 11 moments for boxes one bandwidth
    wide), O(20 P) for each grid point that lands within the tier-1 eps of a .5 boundary
    (~0.2 per row of 4096 weights, ~1 % of the grid points of a row of 10^6), and one
    O(window) exact sum for each that is also within the tier-2 eps (~3e-7 D; a handful
    per row of 10^6); O(sum of window sizes) when the exact path is cheaper or the lattice
    does not apply.
    """
    n = v.shape[0]
    k = grid.shape[0]
    m, P, L = lattice_plan(k, step, h)
    if mode == 1 or m == 0:
        return _direct(v, gend, grid, h, R)
    if mode == 0:
        nbox = min((k - 1) // m + 2, n)
        lattice = (nbox * P * (2 * L + 1) + 2 * n * P) * COST_FMA + (2 * L + 1) * COST_EXP
        if lattice >= _direct_cost(v, grid, h) * COST_EXP:
            return _direct(v, gend, grid, h, R)
    eps, nb, emax, cmax = lattice_density(v, grid, lo, step, h, m, P, L, acc, ework, bwork,
                                          box_id, moments, table)
    if not eps <= MAX_EPS:
        return _direct(v, gend, grid, h, R)
    exact = 0
    for j in range(k):
        r = round_half_even(acc[j])
        if abs(acc[j] - r) < 0.5 - eps:
            R[j] = r  # D is within eps of acc[j], so it rounds the same way
            continue
        near, eps2 = point_density(grid[j], v, lo, step, h, m, P, nb, box_id, moments, emax,
                                   cmax)
        r = round_half_even(near)
        if abs(near - r) < 0.5 - eps2:
            R[j] = r
        else:
            R[j] = round_half_even(exact_density(v, gend, grid[j], h))
            exact += 1
    return exact
