"""Long rows stay linear: checked by operation counts and sizes, never by wall time.

A row of 10^6 values used to spend about a second in exact density sums: the lattice
bound grows with n, so ~0.3 % of its 250k grid points stayed undecided, and each exact
sum reads up to half the row (O(n k) in all). The point evaluation decides those with a
bound that follows D(g); these tests pin that bound against the full float64 sums and
count the exact sums that remain, and the workspace test its size.
"""

from __future__ import annotations

import numpy as np
import pytest

from kenstream.kernels import _ken, _lattice, _rowprep
from kenstream.kernels.ken import select_mask, select_positions
from tests.kernels.test_ken_properties import nasty_row
from tests.slow_ken import bandwidth, densities, grid_points


def tier1(x, k):
    """(v, grid, lo, step, h, plan, approx, eps, nb, emax, cmax, box_id, moments) of the
    lattice path on row x, or None where it does not apply."""
    h = bandwidth(x)
    lo, hi = x.min(), x.max()
    if h == 0 or k < 3:
        return None
    step = (hi - lo) / np.float32(k - 1)
    m, P, L = _lattice.lattice_plan(k, step, h)
    if m == 0:
        return None
    assert P < _lattice.MAX_MOMENTS
    grid = grid_points(lo, hi, k)
    v = np.sort(x)
    v[v == 0] = 0.0
    n = x.size
    approx = np.empty(k)
    box_id = np.empty(k + 3, np.int64)
    moments = np.empty((k + 2, _lattice.MAX_MOMENTS))
    eps, nb, emax, cmax = _lattice.lattice_density(
        v, grid, lo, step, h, m, P, L, approx, np.empty(n), np.empty(n), box_id, moments,
        np.empty((_lattice.MAX_MOMENTS, 4 * k + 3)))
    if not np.isfinite(eps):
        return None
    return v, grid, lo, step, h, (m, P), approx, eps, nb, emax, cmax, box_id, moments


def point(t, j):
    v, grid, lo, step, h, (m, P), _, _, nb, emax, cmax, box_id, moments = t
    return _lattice.point_density(grid[j], v, lo, step, h, m, P, nb, box_id, moments, emax,
                                  cmax)


def test_point_density_bound_holds():
    """At every grid point of awkward rows the tier-2 value is within its bound of the full
    float64 sum; the bound is far below tier 1's, and not vacuous."""
    rng = np.random.default_rng(41)
    worst = 0.0
    ratios = []
    for _ in range(30):
        n = int(rng.integers(64, 2500))
        x = nasty_row(rng, n)
        t = tier1(x, int(rng.integers(3, n)))
        if t is None:
            continue
        grid, h, eps = t[1], t[4], t[7]
        ref = densities(x, grid, h)
        for j in range(grid.size):
            got, bound = point(t, j)
            if not np.isfinite(bound):
                continue
            err = abs(got - ref[j])
            assert err <= bound + 1e-13 * ref[j], (j, err, bound)
            worst = max(worst, err / bound)
            ratios.append(bound / eps)
    assert len(ratios) > 10000
    assert np.median(ratios) < 0.05
    assert worst > 0.05


@pytest.mark.parametrize("kind", ["normal", "student_t", "bf16"])
def test_long_row_points_left_by_tier1_round_as_the_full_sum(kind):
    """On a long row, the grid points tier 1 cannot decide are decided by tier 2 as the
    full float64 sum rounds, with only a few left for exact sums."""
    rng = np.random.default_rng(3)
    x = long_row(rng, 1 << 17, kind)
    t = tier1(x, x.size // 4)
    approx, eps = t[6], t[7]
    undecided = np.flatnonzero(np.abs(approx - np.round(approx)) >= 0.5 - eps)
    assert undecided.size >= 10  # the row is long enough for tier 1 to leave some
    ref = densities(x, t[1][undecided], t[4])
    left = 0
    for j, want in zip(undecided, ref):
        got, bound = point(t, j)
        assert abs(got - want) <= bound + 1e-13 * want
        if abs(got - np.round(got)) >= 0.5 - bound:
            left += 1
        else:
            assert np.round(got) == np.round(want)
    assert left <= 2


def long_row(rng, n, kind):
    if kind == "normal":
        return (rng.standard_normal(n) * 0.02).astype(np.float32)
    if kind == "student_t":
        return (rng.standard_t(3, n) * 0.015).astype(np.float32)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    return ((x.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)  # bf16-rounded


@pytest.mark.parametrize("kind", ["normal", "student_t", "bf16"])
def test_long_rows_need_few_exact_sums(kind):
    """Rows of 2^18 and 2^20 values at k = n / 4 run a handful of O(n) exact sums, not a
    number growing faster than k (before the point evaluation: 58 and 781 on normal rows,
    i.e. O(n^2) work)."""
    rng = np.random.default_rng(11)
    for n in (1 << 18, 1 << 20):
        x = long_row(rng, n, kind)
        status, positions, exact = _ken.positions_row(x.view(np.uint16), n, 0, n // 4, 0)
        assert status == _ken.OK and positions.size == n // 4
        assert exact <= 8, (n, exact)



@pytest.mark.parametrize("kind", ["normal", "bf16"])
def test_wide_rows_sort_stably(kind):
    """Rows beyond WIDE_ROW sort with 8-bit digits: the same stable order as short ones
    (equal values by position, -0.0 equal to 0.0 and stored as 0.0)."""
    rng = np.random.default_rng(5)
    n = _rowprep.WIDE_ROW + 4099
    x = long_row(rng, n, kind)
    x[rng.integers(0, n, 500)] = -0.0
    x[rng.integers(0, n, 500)] = 0.0
    v = np.empty(n, np.float32)
    pos = np.empty(n, np.int32)
    _rowprep.sort_row(x.view(np.uint32), np.empty(n, np.int64), np.empty(n, np.int64),
                      np.empty(3 * _rowprep.RADIX_SIZE, np.int64), v, pos, 1, 0)
    want = np.argsort(x, kind="stable")
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_array_equal(v.view(np.uint32), (x[want] + np.float32(0)).view(np.uint32))


@pytest.mark.parametrize("make", [_ken.make_workspace, _ken.numpy_workspace])
def test_workspace_memory_is_linear(make):
    """A workspace holds 77 bytes a value and 720 a grid point (the Hermite table 512 of
    them, touched only P x (2L + 1)), for any k: no table grows faster than k. The NumPy
    workspace of single long rows has the same arrays."""
    for n, k in ((1 << 12, 1 << 10), (1 << 16, 1 << 14), (1 << 20, 1 << 18)):
        ws = make(n, k)
        reference = _ken.make_workspace(n, k)
        for a, b in zip(ws, reference):
            assert (a.dtype, a.shape, a.flags.c_contiguous) == (b.dtype, b.shape, True)
        assert sum(a.nbytes for a in ws) <= 77 * n + 720 * k + 8 * 3 * _rowprep.RADIX_SIZE \
            + 3072 + 64
    assert _lattice._moments_needed(0.75 * (1 + 1e-9)) < _lattice.MAX_MOMENTS


def test_single_long_row_takes_the_numpy_workspace_path_unchanged():
    """A single row beyond WIDE_ROW runs on a NumPy workspace; its masks are those of the
    same row inside a matrix (numba workspaces, parallel) and of its taken positions."""
    rng = np.random.default_rng(8)
    n = _rowprep.WIDE_ROW + 5
    x = long_row(rng, n, "bf16")
    k = n // 4
    mask = select_mask(x, k)
    want = np.zeros(n, bool)
    want[select_positions(x, k)] = True
    np.testing.assert_array_equal(mask, want)
    both = select_mask(np.stack([x, x]), k, ties="values")
    np.testing.assert_array_equal(select_mask(x, k, ties="values"), both[0])
    np.testing.assert_array_equal(both[0], both[1])
