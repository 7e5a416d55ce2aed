"""Rounded Gaussian KDE densities at the grid points (the visiting-order keys of KEN).

KEN needs only ``R(g) = round_half_even(D(g))`` with

    D(g) = 1 / (n h sqrt(2 pi)) * sum_i exp(-((g - x_i) / h)**2 / 2)        (float64)

at the k grid points. The plain sum costs n*k exps per row; here most ``R`` come from a
cheap approximation ``D~`` with a rigorous absolute error bound ``eps``: when
``|D~ - round(D~)| < 0.5 - eps`` the true D rounds to the same integer. Only grid points
closer than ``eps`` to a ``.5`` boundary get the exact float64 sum. So the result is the
rounding of the float64 sum, not of an approximation (see docs/algorithm.md).

The approximation (a 1-D fast Gauss transform on the grid lattice):

* The grid is, up to float32 rounding, the lattice ``lo + j*step``. Values are binned into
  boxes of ``m`` lattice steps (about one bandwidth wide), centred on lattice points.
* Within a box, ``x = c + e*h`` with ``|e| <= beta/2``; Taylor in ``e`` gives
  ``phi(t - e) = sum_p e**p / p! * He_p(t) phi(t)`` (He = probabilists' Hermite), so each
  box is summarised by P moments ``sum e**p / p!`` and a grid point sees
  ``sum_p moment_p * T_p[offset]`` where the table ``T_p[l] = He_p(l d) phi(l d)`` (``d`` =
  step / h) is shared by every box: a short convolution that vectorises.
* Error bound: Cramer's inequality ``|He_p(t)| phi(t) <= 1.0865 sqrt(p!) exp(-t**2/4)``
  bounds the Taylor tail by ``1.0865 * sum_{p>=P} e**p / sqrt(p!)`` per value; values
  beyond the table reach add at most ``phi(6)`` each; the true grid point differs from
  its lattice point by ``eta*h`` (measured), moving D by at most ``eta * exp(-1/2)`` per
  value; float rounding is bounded generously. All scaled by ``1 / (h sqrt(2 pi))``.

All functions are serial ``@njit`` helpers called once per row from the ``_ken`` driver;
they take sorted float32 values ``v`` (ascending, -0.0 stored as +0.0) and ``gend``
(``gend[i]`` = end of the run of values equal to ``v[i]``) and write float64 ``R``.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import JIT, njit

SQRT_2PI = math.sqrt(2.0 * math.pi)
EXACT_REACH = 9.0  # values beyond 9 h weigh < 2.6e-18 each in the exact sum
TABLE_REACH = 6.0  # values beyond 6 h weigh < 1.6e-8 each in the approximation
CRAMER = 1.0865  # sup_t |He_p(t)| exp(-t^2/4) / sqrt(p!) over all p (Cramer's inequality)
BOX_WIDTH = 1.0  # target box width in bandwidths; wider boxes need more moments
MAX_BOX_WIDTH = 1.5  # a lattice coarser than this gets the exact sum instead
MAX_MOMENTS = 32
TAIL_TOL = 1e-7  # Taylor tail per value, relative to one value's peak weight
MAX_EPS = 0.05  # beyond this bound the approximation decides too little to pay
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
def lower_bound(v, key, lo, hi):
    """First index i in [lo, hi) with float64(v[i]) >= key (hi if none); v ascending."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if v[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


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
def taylor_tail(e, p0):
    """sum_{p >= p0} e**p / sqrt(p!) for e >= 0, rounded up.

    Terms by the recurrence t_{p+1} = t_p e / sqrt(p+1); once the ratio is <= 1/2 and
    the term negligible, the rest is bounded by a geometric series. Cost: ~p0 + 60.
    """
    t = 1.0
    s = 0.0
    p = 0
    while True:
        ratio = e / math.sqrt(p + 1.0)
        if p >= p0:
            s += t
            if ratio <= 0.5 and t <= 1e-30:
                return (s + t * ratio / (1.0 - ratio)) * (1.0 + 1e-12)
        t *= ratio
        p += 1


@njit(**JIT)
def _moments_needed(half):
    """Smallest P (2..MAX_MOMENTS) whose Taylor tail bound for |e| <= half <= 1.5 is
    below TAIL_TOL: the terms half**p / sqrt(p!) shrink by half / sqrt(p + 1) < 1, so
    tail(P) <= term_P / (1 - half / sqrt(P + 1))."""
    term = 1.0
    for p in range(1, MAX_MOMENTS + 1):
        term *= half / math.sqrt(p)
        ratio = half / math.sqrt(p + 1.0)
        if p >= 2 and CRAMER * term / (1.0 - ratio) <= TAIL_TOL:
            return p
    return MAX_MOMENTS


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
def _box_moments(v, lo, step, m, h, P, nbox_max, ework, bwork, box_id, moments):
    """Bin sorted values into boxes of m lattice steps centred on lattice points and
    write moments[q, p] = sum over box q of e**p / p!, e = (x - centre) / h.

    Returns (number of non-empty boxes, max |e|). Scratch ework, bwork float64 [n].
    Cost: O(n P); the first pass vectorises, the second overlaps independent chains.
    """
    n = v.shape[0]
    lo64 = np.float64(lo)
    width = m * np.float64(step)
    inv_width = 1.0 / width
    inv_h = 1.0 / h
    top = np.float64(nbox_max - 1)
    for i in range(n):
        off = np.float64(v[i]) - lo64
        b = min(np.floor(off * inv_width + 0.5), top)  # a clamped value only grows emax
        bwork[i] = b
        ework[i] = (off - b * width) * inv_h
    emax = 0.0
    for i in range(n):
        emax = max(emax, abs(ework[i]))
    nb = 0
    i = 0
    while i < n:
        b = bwork[i]
        stop = i + 1
        while stop < n and bwork[stop] == b:
            stop += 1
        box_id[nb] = int(b)
        mq = moments[nb]
        mq[:P] = 0.0
        for t in range(i, stop):
            # Powers of different values are independent chains: the CPU overlaps them.
            w = 1.0
            e = ework[t]
            for p in range(P):
                mq[p] += w
                w *= e
        inv_fact = 1.0
        for p in range(1, P):
            inv_fact /= p
            mq[p] *= inv_fact
        nb += 1
        i = stop
    return nb, emax


@njit(**JIT)
def _hermite_table(d, L, P, table):
    """table[p, L + l] = He_p(l d) exp(-(l d)**2 / 2) for |l| <= L, p < P. Cost: O(L P)."""
    for l in range(L + 1):
        t = l * d
        phi = math.exp(-(t * t) / 2.0)
        h0 = 1.0
        h1 = t
        table[0, L + l] = phi
        table[0, L - l] = phi
        if P > 1:
            table[1, L + l] = t * phi
            table[1, L - l] = -t * phi
        for p in range(2, P):
            h2 = t * h1 - (p - 1) * h0
            h0 = h1
            h1 = h2
            val = h2 * phi
            table[p, L + l] = val
            table[p, L - l] = val if p % 2 == 0 else -val  # He_p(-t) = (-1)^p He_p(t)


@njit(**JIT)
def _convolve(nb, box_id, m, L, P, moments, table, acc):
    """acc[j] = sum over boxes q, moments p of moments[q, p] * table[p, j - centre_q + L].

    The inner loop runs over slices of consecutive grid points (no index arithmetic, no
    aliasing question left to the compiler), so it vectorises. Cost: O(nb * P * (2L + 1)).
    """
    k = acc.shape[0]
    acc[:] = 0.0
    for q in range(nb):
        c = box_id[q] * m
        jlo = max(0, c - L)
        jhi = min(k - 1, c + L)
        if jhi < jlo:
            continue
        out = acc[jlo:jhi + 1]
        for p in range(P):
            w = moments[q, p]
            row = table[p, jlo - c + L:jhi - c + L + 1]
            for t in range(out.shape[0]):
                out[t] += w * row[t]


@njit(**JIT)
def lattice_plan(k, step, h):
    """(m, P, L) of the lattice path: box width in grid steps, moments, table half-width
    in grid steps; (0, 0, 0) when the grid is too coarse (or degenerate) for it."""
    d = np.float64(step) / h  # lattice spacing in bandwidths
    if not (step > 0.0) or not (d <= MAX_BOX_WIDTH) or k < 3:
        return 0, 0, 0
    m = max(1, int(min(np.float64(k), BOX_WIDTH / d)))  # clamp in float: no int overflow
    half = 0.5 * m * d * (1.0 + 1e-9)
    P = _moments_needed(half)
    L = int(min(np.float64(k + m), math.ceil((TABLE_REACH + half) / d)))
    return m, P, L


@njit(**JIT)
def lattice_density(v, grid, lo, step, h, m, P, L, out, ework, bwork, box_id, moments, table):
    """out[j] = approximation of D(grid[j]) (float64 [k]); returns its error bound eps:
    |out[j] - D(grid[j])| <= eps for every j (see the module docstring). Returns inf
    without computing when the grid strays so far from its lattice that eps > MAX_EPS.

    (m, P, L) from :func:`lattice_plan`; scratch as for :func:`rounded_density`.
    Cost: O(n P + nb P (2L + 1) + L P + k), nb ~ k / m boxes.
    """
    n = v.shape[0]
    k = grid.shape[0]
    d = np.float64(step) / h
    scale = 1.0 / (h * SQRT_2PI)  # n times the normalisation: D <= scale
    # How far the float32 grid strays from the lattice, in bandwidths.
    lo64 = np.float64(lo)
    step64 = np.float64(step)
    eta = 0.0
    for j in range(k):
        eta = max(eta, abs((np.float64(grid[j]) - lo64) - j * step64))
    # Plus the rounding of float64 coordinates, far above its real size.
    eta = (eta + 1e-14 * (abs(lo64) + abs(np.float64(v[n - 1])))) / h
    eps_eta = scale * math.exp(-0.5) * eta
    if eps_eta > MAX_EPS:
        return np.inf
    nbox_max = (k - 1) // m + 2
    nb, emax = _box_moments(v, lo, step, m, h, P, nbox_max, ework, bwork, box_id, moments)
    _hermite_table(d, L, P, table)
    _convolve(nb, box_id, m, L, P, moments, table, out)
    norm = 1.0 / (n * h * SQRT_2PI)
    for j in range(k):
        out[j] *= norm
    reach = (L + 1) * d - emax
    cut = math.exp(-(reach * reach) / 2.0) if reach > 0.0 else 1.0
    rounding = CRAMER * (1.0 + taylor_tail(emax, 1)) * (nb * P + n + 8 * L + 64) * 1e-12
    eps = scale * (CRAMER * taylor_tail(emax, P) + cut + rounding) + eps_eta
    return eps * 1.01 + 1e-12


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
    wide) plus one O(window) exact sum per grid point that lands within eps of a .5
    boundary (~0.2 per row on model-like weights); O(sum of window sizes) when the exact
    path is cheaper or the lattice does not apply.
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
    eps = lattice_density(v, grid, lo, step, h, m, P, L, acc, ework, bwork, box_id, moments,
                          table)
    if not eps <= MAX_EPS:
        return _direct(v, gend, grid, h, R)
    exact = 0
    for j in range(k):
        r = round_half_even(acc[j])
        if abs(acc[j] - r) < 0.5 - eps:
            R[j] = r  # D is within eps of acc[j], so it rounds the same way
        else:
            R[j] = round_half_even(exact_density(v, gend, grid[j], h))
            exact += 1
    return exact
