"""The baseline selection rules against slow NumPy twins written here from their definitions."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from kenstream.errors import MismatchError, NonFiniteError, SelectionError
from kenstream.kernels.baselines import select_mask_method
from tests.slow_rules import (cast, slow_delta, slow_magnitude, slow_random_row, to_bf16_bits,
                              widen)

DTYPES = ("float32", "float64", "float16", "bfloat16")


# --- data with many ties -------------------------------------------------------------------


def tie_rows(rng, rows, cols):
    """float32 rows mixing bf16-rounded normals, a small pool of repeated values, zeros and
    -0.0, and (in some rows) arbitrary finite bit patterns that exercise every radix byte."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
    x = widen(to_bf16_bits(x))
    pool = np.array([0.0, -0.0, 0.25, -0.25, 1e-3, -1e-3, 3.0], np.float32)
    pick = rng.random((rows, cols))
    x = np.where(pick < 0.3, pool[rng.integers(0, pool.size, (rows, cols))], x)
    x = np.where(pick > 0.9, np.float32(0.0), x)
    wild = rng.integers(0, 2**32, (rows // 4, cols), dtype=np.uint64).astype(np.uint32)
    wild &= np.uint32(0xBFFFFFFF)  # top exponent bit clear: |x| < 2, finite in every dtype
    wild_f = wild.view(np.float32)
    x[: rows // 4] = np.where(rng.random((rows // 4, cols)) < 0.7, wild_f, x[: rows // 4])
    return np.ascontiguousarray(x, dtype=np.float32)


def make_pair(dtype, rows=240, cols=41, seed=0):
    rng = np.random.default_rng(seed)
    ft32 = tie_rows(rng, rows, cols)
    base32 = ft32.copy()
    change = rng.random((rows, cols)) < 0.6
    step = widen(to_bf16_bits(rng.standard_normal((rows, cols)).astype(np.float32) * 0.01))
    # +d and -d give equal |delta|: ties on the delta key too.
    sign = np.where(rng.random((rows, cols)) < 0.5, -1, 1).astype(np.float32)
    base32 = np.where(change, ft32 + sign * np.abs(step), base32).astype(np.float32)
    ft = cast(ft32, dtype)
    base = cast(base32, dtype)
    return ft, base


def k_values(cols):
    return (1, cols // 2, cols - 1, cols, cols + 2)


# --- ranking rules -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_matches_slow(dtype):
    ft, base = make_pair(dtype)
    for k in k_values(ft.shape[1]):
        got = select_mask_method("delta", ft, base, k)
        np.testing.assert_array_equal(got, slow_delta(ft, base, k), err_msg=f"k={k}")
        assert (got.sum(axis=1) == min(k, ft.shape[1])).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_matches_slow(dtype):
    ft, _ = make_pair(dtype, seed=1)
    for k in k_values(ft.shape[1]):
        got = select_mask_method("magnitude", ft, None, k)
        np.testing.assert_array_equal(got, slow_magnitude(ft, k), err_msg=f"k={k}")
        assert (got.sum(axis=1) == min(k, ft.shape[1])).all()


@pytest.mark.parametrize("method", ["delta", "magnitude"])
@pytest.mark.parametrize("ties", ["scrambled", "values", "positions"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ranking_rules_break_ties_by_the_mode(method, ties, dtype):
    """Equal keys at a row's k-th largest: the lowest columns (positions), the first from a
    column drawn from (seed, salt, row), wrapping around (scrambled), or all of them
    (values), against the slow twin; cut into row chunks with row_offset, the same masks.
    Scrambled and positions differ where there are ties to break."""
    ft, base = make_pair(dtype, rows=96, cols=53, seed=4)
    b = base if method == "delta" else None
    slow = slow_delta if method == "delta" else slow_magnitude
    for k in (1, 7, 26, 52, 53):
        got = select_mask_method(method, ft, b, k, ties=ties, seed=5, salt=11)
        want = slow(ft, base, k, ties, seed=5, salt=11) if method == "delta" \
            else slow(ft, k, ties, seed=5, salt=11)
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
        kept = got.sum(axis=1)
        if ties == "values":
            assert (kept >= min(k, 53)).all()
        else:
            assert (kept == min(k, 53)).all()
        parts = [select_mask_method(method, ft[r:r + 40], None if b is None else b[r:r + 40], k,
                                    ties=ties, seed=5, salt=11, row_offset=r)
                 for r in range(0, 96, 40)]
        np.testing.assert_array_equal(np.concatenate(parts), got, err_msg=f"k={k} chunks")
    if ties == "scrambled":
        assert any(not np.array_equal(select_mask_method(method, ft, b, k, ties=ties, seed=5),
                                      select_mask_method(method, ft, b, k, ties="positions"))
                   for k in (1, 7, 26, 52))


def test_scrambled_ties_take_no_side_of_a_bf16_row():
    """bf16 changes take few distinct values, so many tie at the k-th largest: taken from
    the lowest columns, the first quarter of a row kept twice the share of the last at keep
    0.25 (0.33 against 0.16); scrambled, every quarter keeps its quarter."""
    rng = np.random.default_rng(0)
    base32 = (rng.standard_normal((256, 4096)) * 0.02).astype(np.float32)
    ft = to_bf16_bits(base32 + (rng.standard_normal((256, 4096)) * 2e-4).astype(np.float32))
    base = to_bf16_bits(base32)
    share = {ties: select_mask_method("delta", ft, base, 1024, ties=ties, salt=3)
             .reshape(256, 4, 1024).mean(axis=(0, 2)) for ties in ("positions", "scrambled")}
    assert share["positions"][0] - share["positions"][3] > 0.1
    assert np.abs(share["scrambled"] - 0.25).max() < 0.01


def test_delta_mixed_dtypes_and_float32_rounding():
    # float64 values that collapse to one float32 must tie; bf16 base against float64 ft.
    rng = np.random.default_rng(5)
    base32 = widen(to_bf16_bits(rng.standard_normal((64, 300)).astype(np.float32)))
    ft64 = base32.astype(np.float64) + rng.choice([0.0, 1e-9, 0.5, -0.5, 0.5 + 1e-12], (64, 300))
    base = to_bf16_bits(base32)
    for k in (1, 7, 150, 299):
        got = select_mask_method("delta", ft64, base, k)
        np.testing.assert_array_equal(got, slow_delta(ft64, base, k))


def test_long_rows_hit_every_radix_pass():
    rng = np.random.default_rng(9)
    ft = tie_rows(rng, 32, 5000)
    for k in (1, 13, 2500, 4999):
        np.testing.assert_array_equal(
            select_mask_method("magnitude", ft, k=k), slow_magnitude(ft, k)
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_finite_16_bit_pattern(dtype):
    # Subnormals, the largest finite values and both zeros, in one shuffled set of rows.
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    if dtype == "float16":
        vals = bits.view(np.float16)
        keep = np.isfinite(vals)
    else:
        keep = (bits & 0x7F80) != 0x7F80
    rng = np.random.default_rng(8)
    ft = rng.permutation(bits[keep])[: 2**15].reshape(32, -1)
    base = rng.permutation(bits[keep])[: 2**15].reshape(32, -1)
    if dtype == "float16":
        ft, base = ft.view(np.float16), base.view(np.float16)
    for k in (1, 300, 1023):
        np.testing.assert_array_equal(
            select_mask_method("magnitude", ft, k=k), slow_magnitude(ft, k)
        )
        np.testing.assert_array_equal(
            select_mask_method("delta", ft, base, k), slow_delta(ft, base, k)
        )


def test_signed_zeros_are_equal_magnitudes():
    ft = np.array([[-0.0, 0.0, -0.0, 0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(
        select_mask_method("magnitude", ft, k=3), [[True, True, False, False, True]]
    )


def test_shapes_follow_row_convention():
    rng = np.random.default_rng(2)
    x3 = tie_rows(rng, 24, 30).reshape(4, 6, 30)
    got = select_mask_method("magnitude", x3, k=50)
    assert got.shape == x3.shape
    np.testing.assert_array_equal(got.reshape(4, 180), slow_magnitude(x3.reshape(4, 180), 50))
    x1 = x3[0, 0]
    np.testing.assert_array_equal(
        select_mask_method("magnitude", x1, k=4), slow_magnitude(x1[None], 4)[0]
    )
    assert select_mask_method("delta", np.float32(2.0), np.float32(1.0), k=1).tolist() is True


def test_readonly_memmap_and_strided_inputs(tmp_path):
    ft, base = make_pair("float32", rows=64, cols=33, seed=3)
    np.save(tmp_path / "ft.npy", ft)
    np.save(tmp_path / "base.npy", base)
    ft_map = np.load(tmp_path / "ft.npy", mmap_mode="r")
    base_map = np.load(tmp_path / "base.npy", mmap_mode="r")
    assert not ft_map.flags.writeable
    np.testing.assert_array_equal(
        select_mask_method("delta", ft_map, base_map, 9), slow_delta(ft, base, 9)
    )
    np.testing.assert_array_equal(
        select_mask_method("magnitude", ft_map.T, None, 5), slow_magnitude(ft.T, 5)
    )


def test_out_is_filled_in_place():
    ft, base = make_pair("bfloat16", rows=40, cols=20, seed=4)
    out = np.ones(ft.shape, bool)
    got = select_mask_method("delta", ft, base, 3, out=out)
    assert got is out
    np.testing.assert_array_equal(out, slow_delta(ft, base, 3))
    out[:] = True
    select_mask_method("random", ft, k=2, out=out)
    assert (out.sum(axis=1) == 2).all()


def test_thread_count_does_not_change_masks():
    ft, base = make_pair("float32", rows=300, cols=57, seed=6)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            results.append([
                select_mask_method("delta", ft, base, 11),
                select_mask_method("magnitude", ft, None, 11),
                select_mask_method("random", ft, None, 11, seed=3, salt=4),
            ])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --- random --------------------------------------------------------------------------------


def test_random_matches_documented_stream():
    ft = np.zeros((12, 23), np.float32)
    for seed, salt, offset, k in ((0, 0, 0, 5), (7, 99, 1000, 1), (2**64 - 1, 3, 2**40, 22)):
        got = select_mask_method("random", ft, k=k, seed=seed, salt=salt, row_offset=offset)
        want = np.stack([slow_random_row(seed, salt, offset + i, 23, k) for i in range(12)])
        np.testing.assert_array_equal(got, want)


def test_random_exact_count_and_determinism():
    ft, _ = make_pair("float16", rows=200, cols=31, seed=7)
    for k in k_values(31):
        a = select_mask_method("random", ft, k=k, seed=11, salt=5)
        assert (a.sum(axis=1) == min(k, 31)).all()
        np.testing.assert_array_equal(a, select_mask_method("random", ft, k=k, seed=11, salt=5))
    # The mask depends on the shape, seed, salt and rows only, not on the values.
    other = np.ones(ft.shape, np.float32)
    np.testing.assert_array_equal(
        select_mask_method("random", ft, k=9, seed=11, salt=5),
        select_mask_method("random", other, k=9, seed=11, salt=5),
    )


def test_random_is_chunk_independent():
    ft = np.zeros((257, 40), np.float32)
    whole = select_mask_method("random", ft, k=10, seed=1, salt="layer.0.weight")
    cuts = [0, 1, 16, 17, 100, 255, 257]
    pieces = [
        select_mask_method("random", ft[a:b], k=10, seed=1, salt="layer.0.weight", row_offset=a)
        for a, b in zip(cuts[:-1], cuts[1:])
    ]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_random_seeds_and_salts_differ():
    ft = np.zeros((64, 50), np.float32)
    a = select_mask_method("random", ft, k=10, seed=0)
    assert not np.array_equal(a, select_mask_method("random", ft, k=10, seed=1))
    assert not np.array_equal(a, select_mask_method("random", ft, k=10, seed=0, salt=1))
    assert not np.array_equal(
        select_mask_method("random", ft, k=10, salt="q.weight"),
        select_mask_method("random", ft, k=10, salt="k.weight"),
    )
    # Rows of one call differ from each other too.
    assert len({row.tobytes() for row in a}) > 60


def test_random_is_uniform_over_positions():
    rows, cols, k = 20000, 10, 3
    mask = select_mask_method("random", np.zeros((rows, cols), np.float32), k=k, seed=123)
    freq = mask.sum(axis=0)
    expect = rows * k / cols
    sd = np.sqrt(rows * (k / cols) * (1 - k / cols))
    assert np.abs(freq - expect).max() < 5 * sd
    # Pairs are uniform too (Floyd's algorithm gives every k-subset the same chance).
    pair = (mask[:, 0] & mask[:, 9]).sum()
    p = k * (k - 1) / (cols * (cols - 1))
    assert abs(pair - rows * p) < 5 * np.sqrt(rows * p * (1 - p))


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -3, None, 2.5, True])
def test_bad_k(k):
    with pytest.raises(SelectionError):
        select_mask_method("magnitude", np.ones((2, 3), np.float32), k=k)


def test_unknown_method_and_bad_inputs():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(SelectionError, match="unknown selection method"):
        select_mask_method("ken++", x, k=1)
    with pytest.raises(SelectionError):
        select_mask_method("delta", x, None, 1)
    with pytest.raises(MismatchError):
        select_mask_method("delta", x, np.ones((3, 2), np.float32), 1)
    with pytest.raises(SelectionError):
        select_mask_method("magnitude", x.astype(np.int32), k=1)
    with pytest.raises(SelectionError):
        select_mask_method("magnitude", x, k=1, out=np.zeros((2, 3), np.uint8))
    with pytest.raises(SelectionError):
        select_mask_method("random", x, k=1, row_offset=-1)


@pytest.mark.parametrize("method", ["delta", "magnitude", "random"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_fine_tune_names_the_row(method, bad):
    ft = np.ones((6, 5), np.float32)
    ft[4, 2] = bad
    with pytest.raises(NonFiniteError) as err:
        select_mask_method(method, ft, np.zeros_like(ft), 2, row_offset=100)
    assert err.value.row == 104


def test_non_finite_base_and_float32_overflow():
    ft = np.ones((4, 5), np.float32)
    base = np.zeros_like(ft)
    base[1, 0] = np.nan
    with pytest.raises(NonFiniteError) as err:
        select_mask_method("delta", ft, base, 2)
    assert err.value.row == 1 and "base" in str(err.value)
    # Finite in float64 but not in float32, where the rule is computed.
    big = np.ones((3, 4))
    big[2, 3] = 1e300
    with pytest.raises(NonFiniteError) as err:
        select_mask_method("magnitude", big, k=1)
    assert err.value.row == 2
    nan_bf16 = np.full((2, 3), 0x3F80, np.uint16)
    nan_bf16[1, 1] = 0x7FC0
    with pytest.raises(NonFiniteError):
        select_mask_method("magnitude", nan_bf16, k=1)
