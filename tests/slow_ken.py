"""Slow, literal NumPy implementation of KEN row selection (tests and benchmarks only).

Follows shared/golden/README.md step by step with no cleverness: numpy's own np.std,
the float64 density summed over every value at every grid point, np.lexsort for the
visiting order, and for each grid point a float32 distance to every free position.
Cost: O(n k) time and memory per row. Also implements kenstream's product decisions
(docs/algorithm.md) the plain way, so the fast kernel can be checked against it:

* k >= n keeps the whole row;
* ties="scrambled": equal distances go to the position of lowest rank in the row's
  scrambled order (``scrambled_ranks``) instead of the lowest position;
* zero float32 std (constant row, n == 1, underflow): every density counts as 0, so grid
  points are visited in grid order;
* k < 1, non-finite values, or a std / range that overflows float32: ValueError.
"""

from __future__ import annotations

import numpy as np

from tests.slow_rules import row_stream, scrambled_ranks  # noqa: F401


class SlowNonFinite(ValueError):
    """The row holds a NaN or infinity."""


class SlowOverflow(ValueError):
    """The float32 std or range of the row is not finite."""


def bandwidth(x: np.ndarray) -> float:
    """README step 1."""
    s = np.std(x)
    return float(np.float32(1.06) * s) * x.size ** (-1 / 5)


def grid_points(lo: np.float32, hi: np.float32, k: int) -> np.ndarray:
    """README step 2: numpy linspace on float32 endpoints."""
    return np.linspace(lo, hi, k)


def densities(x: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """README step 3: the full float64 sum at every grid point."""
    xd = x.astype(np.float64)
    n = x.size
    out = np.empty(grid.size, np.float64)
    for j, g in enumerate(grid.astype(np.float64)):
        out[j] = np.sum(np.exp(-(((g - xd) / h) ** 2) / 2)) / (n * h * np.sqrt(2 * np.pi))
    return out


def ken_row(row, k: int, rank=None):
    """(positions int64 [min(k, n)] in visiting order, value-mask bool [n]) of a float32 row.

    Equal distances go to the lowest ``rank`` (default: the position itself)."""
    x = np.asarray(row)
    if x.dtype != np.float32 or x.ndim != 1:
        raise TypeError("the slow reference takes a 1-D float32 row")
    if k < 1:
        raise ValueError("k < 1")
    if not np.all(np.isfinite(x)):
        raise SlowNonFinite("non-finite value")
    n = x.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.std(x)
        span = x.max() - x.min()
    if not (np.isfinite(s) and np.isfinite(span)):
        raise SlowOverflow("std or range overflows float32")
    h = bandwidth(x)
    grid = grid_points(x.min(), x.max(), k)
    assert grid.dtype == np.float32
    if h == 0 or k == 1:
        rounded = np.zeros(k)
    else:
        rounded = np.round(densities(x, grid, h))
    order = np.lexsort((np.arange(k), -rounded))  # R descending, then grid index
    rank = np.arange(n) if rank is None else np.asarray(rank)
    free = np.ones(n, bool)
    positions = []
    for j in order:
        if not free.any():
            break
        d = np.abs(x - grid[j])  # float32 arithmetic
        assert d.dtype == np.float32
        d = np.where(free, d, np.float32(np.inf))
        nearest = np.flatnonzero(d == d.min())
        i = int(nearest[np.argmin(rank[nearest])])  # equal distances: the lowest rank
        free[i] = False
        positions.append(i)
    positions = np.array(positions, np.int64)
    mask = np.zeros(n, bool)
    for value in np.unique(x[positions]):
        mask |= x == value
    return positions, mask


def ken_mask(row, k: int, ties: str = "positions", *, seed=0, salt=0, row_number=0):
    """Mask of one float32 row in kenstream's tie modes (k >= n keeps everything);
    ``scrambled`` draws its order from (seed, salt, row_number)."""
    x = np.asarray(row)
    if k >= 1 and k >= x.size:
        if not np.all(np.isfinite(x)):
            raise SlowNonFinite("non-finite value")
        return np.ones(x.size, bool)
    rank = scrambled_ranks(x.size, seed, salt, row_number) if ties == "scrambled" else None
    positions, value_mask = ken_row(x, k, rank)
    if ties == "values":
        return value_mask
    mask = np.zeros(x.size, bool)
    mask[positions] = True
    return mask


def widen_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16), by shifting."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
