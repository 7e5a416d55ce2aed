"""The lattice approximation of the KDE densities: a 1-D fast Gauss transform on the grid.

:mod:`._density` decides ``R = round(D)`` from an approximation ``D~`` and a rigorous
bound ``eps`` on ``|D~ - D|``; this module computes both, in two tiers.

**Tier 1, every grid point at once** (:func:`lattice_density`):

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
  value; float rounding is bounded generously. All scaled by ``1 / (h sqrt(2 pi))``, the
  largest D can be: ``eps`` is one number for the whole row, and on long rows it grows
  (``eta / h`` and the rounding with n).

**Tier 2, one grid point** (:func:`point_density`, for the few points tier 1 leaves
undecided): the same box moments summed at the grid point itself, not at its lattice
point (no ``eta`` term), with every error term weighted by what the boxes near the point
hold instead of by the peak, so ``eps`` scales with ``D(g)`` itself (about
``3e-7 * D + 1e-12``) whatever the row length. Cost O(P) per box within ``9 h``.

Moments are summed in chunks of 64 values, chunks in groups of 64, so that the rounding
of a box of c values is ``(130 + c / 4096) u`` relative per value, not ``c u``: boxes of
long rows hold 10^4 to 10^6 values.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import JIT, njit

SQRT_2PI = math.sqrt(2.0 * math.pi)
EXACT_REACH = 9.0  # values beyond 9 h weigh < 2.6e-18 each (exact sums and tier 2 alike)
TABLE_REACH = 6.0  # values beyond 6 h weigh < 1.6e-8 each in the approximation
CRAMER = 1.0865  # sup_t |He_p(t)| exp(-t^2/4) / sqrt(p!) over all p (Cramer's inequality)
BOX_WIDTH = 1.0  # target box width in bandwidths; wider boxes need more moments
MAX_BOX_WIDTH = 1.5  # a lattice coarser than this gets the exact sum instead
MAX_MOMENTS = 16  # boxes reach at most 0.75 h from their centre, which needs P = 14
TAIL_TOL = 1e-7  # Taylor tail per value, relative to one value's peak weight
MAX_EPS = 0.05  # beyond this bound the approximation decides too little to pay
CHUNK = 64  # values per partial moment sum, and partial sums per group
U = 2.0 ** -53  # unit roundoff of float64
MAX_SHIFT = 1e-6  # tier 2 needs coordinates accurate to this many bandwidths


@njit(**JIT)
def lower_bound(a, key, lo, hi):
    """First index i in [lo, hi) with a[i] >= key (hi if none); a ascending (sorted values,
    box indices), compared in float64."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**JIT)
def gamma(count):
    """Higham's gamma_n = n u / (1 - n u): relative error of n chained roundings."""
    nu = count * U
    return nu / (1.0 - nu)


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
def _box_moments(v, lo, step, m, h, P, nbox_max, ework, bwork, box_id, moments):
    """Bin sorted values into boxes of m lattice steps centred on lattice points and
    write moments[q, p] = sum over box q of e**p / p!, e = (x - centre) / h.

    Returns (number of non-empty boxes, max |e|, most values in one box). Scratch ework,
    bwork float64 [n]. Cost: O(n P); the first pass vectorises, the second overlaps
    independent chains. Sums run in chunks of CHUNK values and groups of CHUNK chunks
    (see the module docstring); moments[q, 0] is the box's count, exactly.
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
    chunk = np.empty(P, np.float64)
    group = np.empty(P, np.float64)
    nb = 0
    cmax = 0
    i = 0
    while i < n:
        b = bwork[i]
        stop = i + 1
        while stop < n and bwork[stop] == b:
            stop += 1
        box_id[nb] = int(b)
        mq = moments[nb]
        mq[:P] = 0.0
        group[:] = 0.0
        chunks = 0
        for c0 in range(i, stop, CHUNK):
            chunk[:] = 0.0
            for t in range(c0, min(c0 + CHUNK, stop)):
                # Powers of different values are independent chains: the CPU overlaps them.
                w = 1.0
                e = ework[t]
                for p in range(P):
                    chunk[p] += w
                    w *= e
            for p in range(P):
                group[p] += chunk[p]
            chunks += 1
            if chunks == CHUNK:
                for p in range(P):
                    mq[p] += group[p]
                group[:] = 0.0
                chunks = 0
        inv_fact = 1.0
        for p in range(P):
            if p > 1:
                inv_fact /= p
            mq[p] = (mq[p] + group[p]) * inv_fact
        cmax = max(cmax, stop - i)
        nb += 1
        i = stop
    return nb, emax, cmax


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
    """Tier 1: out[j] = approximation of D(grid[j]) (float64 [k]); returns (eps, nb, emax,
    cmax): its error bound, |out[j] - D(grid[j])| <= eps for every j (see the module
    docstring), and the moments' summary :func:`point_density` needs (boxes, max |e|,
    most values in a box). eps is inf, and nothing computed, when the grid strays so far
    from its lattice that eps > MAX_EPS.

    (m, P, L) from :func:`lattice_plan`; scratch as for ``_density.rounded_density``.
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
        return np.inf, 0, 0.0, 0
    nbox_max = (k - 1) // m + 2
    nb, emax, cmax = _box_moments(v, lo, step, m, h, P, nbox_max, ework, bwork, box_id, moments)
    _hermite_table(d, L, P, table)
    _convolve(nb, box_id, m, L, P, moments, table, out)
    norm = 1.0 / (n * h * SQRT_2PI)
    for j in range(k):
        out[j] *= norm
    reach = (L + 1) * d - emax
    cut = math.exp(-(reach * reach) / 2.0) if reach > 0.0 else 1.0
    # 1e-12 a term is far above the real rounding (~130 u) unless a box holds ~10^7 values.
    per_value = max(1e-12, 2.0 * gamma(4 * P + 256 + cmax / CHUNK ** 2))
    rounding = CRAMER * (1.0 + taylor_tail(emax, 1)) * ((nb * P + 8 * L + 64) * 1e-12
                                                         + n * per_value)
    eps = scale * (CRAMER * taylor_tail(emax, P) + cut + rounding) + eps_eta
    return eps * 1.01 + 1e-12, nb, emax, cmax


@njit(**JIT)
def point_density(g, v, lo, step, h, m, P, nb, box_id, moments, emax, cmax):
    """Tier 2: (D~, eps) at one grid point g from the box moments of
    :func:`lattice_density` (same v, lo, step, h, m, P; its nb, emax, cmax), with
    |D~ - D(g)| <= eps. eps is inf when coordinates carry too much rounding (rows whose
    spread is tiny next to their magnitude).

    Boxes whose centre lies within ``9 + 1 + emax`` bandwidths of g are summed at
    ``t = (g - centre) / h`` computed as the moments' ``e`` are; the others hold only
    values beyond 9 h. With ``A = sum_q c_q phi(t_q) exp(emax |t_q| + emax^2 / 2)``, which
    bounds ``sum_q sum_p |M_qp| |He_p(t_q)| phi(t_q)`` (generating function of the
    absolute Hermite polynomials), the terms are, before normalisation:
    Taylor ``1.0865 tail(emax, P) sum_q c_q exp(-t_q^2 / 4)`` (Cramer); cut
    ``n phi(9)``; shifted coordinates ``delta (10 + 2 emax) A`` where ``delta`` bounds the
    rounding of ``t - e`` in bandwidths; arithmetic ``2 gamma_N A`` with N counting the
    roundings of moments, Hermite recurrence (bounded by the absolute recurrence),
    ``exp`` and sums. Cost: O(P) per box within reach, about 20 boxes.
    """
    n = v.shape[0]
    lo64 = np.float64(lo)
    width = m * np.float64(step)
    inv_h = 1.0 / h
    reach = EXACT_REACH + 1.0 + emax
    # |computed (t - e) - (g - x) / h|: the subtractions round relative to the span.
    delta = 2.0 * U * (2.0 * (np.float64(v[n - 1]) - lo64) * inv_h + 3.0 * (reach + emax) + 4.0)
    if not delta <= MAX_SHIFT:
        return 0.0, np.inf
    off = np.float64(g) - lo64
    # No box below this index is within reach.
    first = lower_bound(box_id, (off - (reach + 1.0) * h) / width, 0, nb)
    total = 0.0
    taylor = 0.0
    absolute = 0.0
    nq = 0
    for q in range(first, nb):
        t = (off - box_id[q] * width) * inv_h  # the centre as _box_moments measures from
        if t < -reach:
            break
        if t > reach:
            continue
        phi = math.exp(-(t * t) / 2.0)
        mq = moments[q]
        s = mq[0]
        h0 = 1.0
        h1 = t
        if P > 1:
            s += mq[1] * t
        for p in range(2, P):
            h2 = t * h1 - (p - 1) * h0
            h0 = h1
            h1 = h2
            s += mq[p] * h2
        total += s * phi
        taylor += mq[0] * math.sqrt(phi)
        absolute += mq[0] * phi * math.exp(emax * abs(t) + 0.5 * emax * emax)
        nq += 1
    norm = 1.0 / (n * h * SQRT_2PI)
    rounds = cmax / CHUNK ** 2 + 2 * CHUNK + 8 * P + nq + reach * reach + 64
    err = (CRAMER * taylor_tail(emax, P) * taylor
           + n * math.exp(-EXACT_REACH * EXACT_REACH / 2.0)
           + delta * (reach + emax + 1.0) * 1.001 * absolute
           + 2.0 * gamma(rounds) * absolute)
    dens = total * norm
    return dens, err * norm * 1.01 + 16.0 * U * abs(dens) + 1e-300

