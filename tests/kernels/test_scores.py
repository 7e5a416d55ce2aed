"""The score bins of the budgets and their cuts, against tests/slow_budget.py and plain
sorting: every input dtype, block cutting, exact counts at a cut, NaN rows."""

from __future__ import annotations

import numpy as np
import pytest

from kenstream.errors import NonFiniteError
from kenstream.kernels import scores
from tests.slow_budget import normalised, score_bins, shift, spread
from tests.slow_rules import cast


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("method", ["delta", "magnitude", "random"])
def test_raw_bins_are_the_twins(dtype, method):
    rng = np.random.default_rng(1)
    base32 = rng.normal(0, 0.05, (9, 37)).astype(np.float32)
    ft32 = base32 + rng.normal(0, 1e-3, base32.shape).astype(np.float32)
    ft32[2, :5] = base32[2, :5]  # zero scores
    ft, base = cast(ft32, dtype), cast(base32, dtype)
    got = scores.raw_bins(method, ft, base, seed=7, salt=np.uint32(0), row_offset=0)
    # the twin's salt is crc32 of a name; random draws are compared with name "" (salt 0)
    want = score_bins(method, ft, base, "", seed=7)
    assert np.array_equal(got, want)
    # cut into blocks, a block's rows say where they are
    parts = [scores.raw_bins(method, ft[r0:r1], base[r0:r1], seed=7, salt=0, row_offset=r0)
             for r0, r1 in ((0, 4), (4, 9))]
    assert np.array_equal(np.concatenate(parts), got)


def test_shift_and_normalised_histogram_are_the_twins():
    rng = np.random.default_rng(2)
    for scale in (1e-6, 1e-2, 3.0, 1e4):
        x = (rng.standard_t(3, (20, 30)) * scale).astype(np.float32)
        x[0, :7] = 0
        bins = scores.raw_bins("magnitude", x)
        s = scores.shift_of(scores.histogram(bins))
        assert s == shift(bins.astype(np.int64), "magnitude")
        hist = scores.normalise_hist(scores.histogram(bins), s)
        norm = normalised(bins.astype(np.int64), s)
        assert np.array_equal(hist, np.bincount(norm.ravel(), minlength=scores.NORM_BINS))


@pytest.mark.parametrize("shift_", [-300, 0, 41])
@pytest.mark.parametrize("target", [0, 1, 17, 150, 520, 599, 600, 700])
@pytest.mark.parametrize("spread_", [False, True])
def test_cut_and_masks_keep_exactly_the_target(target, shift_, spread_):
    """The cut bin's quota goes to its first positions, or spread evenly over it (the
    twin's rule), block after block."""
    rng = np.random.default_rng(3)
    bins = rng.integers(8000, 8006, (20, 30)).astype(np.uint16)  # many ties
    bins[rng.random(bins.shape) < 0.15] = 0  # zero scores, below every other
    norm = normalised(bins.astype(np.int64), shift_)  # the twin's
    cut, quota = scores.cut_of(np.bincount(norm.ravel(), minlength=scores.NORM_BINS), target)
    count = int((norm == cut).sum())
    seen, masks = 0, []
    for r0 in range(0, 20, 7):  # blocks of rows, the positions seen carried across them
        mask, seen = scores.mask_of(bins[r0:r0 + 7], shift_, cut, quota, seen,
                                    count if spread_ else None)
        masks.append(mask)
    mask = np.concatenate(masks).ravel()
    want = norm.ravel() > cut
    tied = np.flatnonzero(norm.ravel() == cut)
    want[tied[spread(quota, count) if spread_ else slice(0, quota)]] = True
    if target >= norm.size:
        want[:] = True
    assert int(mask.sum()) == min(target, norm.size)
    assert np.array_equal(mask, want)


def test_spread_counts_past_int64_exactly():
    """A quota times a count beyond 2**63 (a bin of 2**40 positions) takes the same
    positions as Python's integers say."""
    count, quota = 1 << 40, (1 << 39) + 12345
    seen = count - 10
    bins = np.full((1, 10), 9000, np.uint16)
    cut = int(normalised(np.array([9000]), 0)[0])  # the twin's bin of raw 9000
    mask, after = scores.mask_of(bins, 0, cut, quota, seen, count)
    want = [(j + 1) * quota // count > j * quota // count for j in range(seen, count)]
    assert after == count
    assert mask.ravel().tolist() == want and 0 < sum(want) < 10


def test_nan_rows_are_named():
    x = np.zeros((5, 4), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(NonFiniteError) as exc:
        scores.raw_bins("delta", np.ones((5, 4), np.float32), x, row_offset=10)
    assert exc.value.row == 13 and "base" in str(exc.value)
