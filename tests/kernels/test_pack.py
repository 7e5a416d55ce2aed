"""The numba packer against NumPy's packbits and boolean indexing."""

import numpy as np
import pytest

from kenstream.kernels import pack as pack_module
from kenstream.kernels.pack import pack_pair, pack_rows, row_counts


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16, np.float64, np.int8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 17), (0, 5), (6, 64), (9, 130)])
def test_pack_rows_matches_numpy(dtype, shape):
    """Densities on both sides of 3/4, where a row's set bits are walked or every column
    is visited; rows of whole 64-column words, a few bytes, and both."""
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 0.8, 1.0):
        mask = rng.random(shape) < density
        values = rng.integers(0, 255, size=shape).astype(dtype)
        packed, kept = pack_rows(mask, values, np.count_nonzero(mask, axis=1))
        assert np.array_equal(packed, np.packbits(mask, axis=1, bitorder="little"))
        assert kept.dtype == values.dtype
        assert np.array_equal(kept.view(np.uint8), values[mask].view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64, np.int8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 17), (0, 5), (6, 64), (2, 1001)])
def test_pack_pair_and_row_counts_match_numpy(dtype, shape):
    """Both tensors' kept values in mask order, the bits and the per-row counts."""
    rng = np.random.default_rng(sum(shape) + 1)
    for density in (0.0, 0.03, 0.3, 0.8, 1.0):
        mask = rng.random(shape) < density
        values = rng.integers(0, 255, size=shape).astype(dtype)
        base = rng.integers(0, 255, size=shape).astype(dtype)
        counts = row_counts(mask)
        assert counts.dtype == np.int64
        assert counts.tolist() == [int(row.sum()) for row in mask]
        packed, kept, kept_base = pack_pair(mask, values, base, counts)
        assert np.array_equal(packed, np.packbits(mask, axis=1, bitorder="little"))
        assert kept.dtype == values.dtype and kept_base.dtype == base.dtype
        assert np.array_equal(kept.view(np.uint8), values[mask].view(np.uint8))
        assert np.array_equal(kept_base.view(np.uint8), base[mask].view(np.uint8))


@pytest.mark.parametrize("density", [0.3, 0.9])
def test_pack_never_writes_past_a_row_s_count(density):
    """Counts one short of the mask's: each row gives its first kept values only, and
    nothing is written past the last row's slots (a numba kernel has no bounds check)."""
    rng = np.random.default_rng(5)
    mask = rng.random((4, 200)) < density
    values = rng.integers(1, 1000, size=mask.shape).astype(np.uint16)
    counts = row_counts(mask) - 1
    offsets = np.concatenate([[0], np.cumsum(counts)])
    packed = np.empty((4, 25), np.uint8)
    out = np.zeros(int(offsets[-1]) + 8, np.uint16)
    pack_module._pack_serial(mask.view(np.uint8), values, values, False, offsets, packed, out, out)
    expect = np.concatenate([values[r][mask[r]][:counts[r]] for r in range(4)])
    assert np.array_equal(out[:offsets[-1]], expect)
    assert not out[offsets[-1]:].any()


def test_pack_keeps_nan_payloads_and_negative_zero():
    bits = np.array([[0x7FC00001, 0x80000000, 0xFF800000, 0x3F800000]], dtype=np.uint32)
    values = bits.view(np.float32)
    mask = np.array([[True, True, False, True]])
    _, kept = pack_rows(mask, values, np.array([3]))
    assert kept.view(np.uint32).tolist() == [0x7FC00001, 0x80000000, 0x3F800000]


_SHAPES = [(1, 1), (5, 13), (40, 64), (3, 0), (0, 9), (7, 8), (4, 203), (2, 1000)]
_DENSITIES = (0.0, 0.02, 0.4, 0.97, 1.0)


def _case(rng, shape, density, dtype):
    """A mask with all-zero, all-one and mixed bytes at these densities, its values and a base."""
    mask = rng.random(shape) < density
    values = rng.integers(0, 1000, size=int(mask.sum())).astype(dtype)
    base = rng.integers(0, 1000, size=shape).astype(dtype)
    expected = base.copy()
    expected[mask] = values
    return mask, np.packbits(mask, axis=1, bitorder="little"), values, base, expected


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64, np.uint8])
@pytest.mark.parametrize("kernel", ["in_place", "merge_into"])
def test_scatter_kernels_match_numpy(dtype, kernel):
    from kenstream.kernels import pack as _pack

    rng = np.random.default_rng(7)
    for shape in _SHAPES:
        for density in _DENSITIES:
            mask, packed, values, base, expected = _case(rng, shape, density, dtype)
            counts = np.count_nonzero(mask, axis=1)
            if kernel == "in_place":  # rebuild may merge over the base rows it was given
                got = base.copy()
                _pack.merge_into(got, got, packed, values, counts)
            else:
                base.flags.writeable = False  # the base is a read-only memory map in rebuild
                got = np.full(shape, 77, dtype=dtype)
                _pack.merge_into(got, base, packed, values, counts)
            assert np.array_equal(got, expected), (shape, density)


def test_merge_refuses_too_few_values():
    from kenstream.kernels.pack import merge_into

    mask = np.array([[True, False, True]])
    packed = np.packbits(mask, axis=1, bitorder="little")
    out = np.zeros((1, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        merge_into(out, out, packed, np.ones(1, dtype=np.float32), np.array([2]))
    with pytest.raises(ValueError):
        merge_into(out, out.copy(), packed, np.ones(1, dtype=np.float32), np.array([2]))


def test_row_popcounts_match_unpackbits():
    from kenstream.kernels.pack import row_popcounts

    rng = np.random.default_rng(5)
    for shape in [(0, 4), (1, 1), (9, 13), (300, 41), (3, 0)]:
        packed = rng.integers(0, 256, size=shape, dtype=np.uint8)
        expected = np.unpackbits(packed, axis=1).sum(axis=1) if packed.size else np.zeros(shape[0])
        assert np.array_equal(row_popcounts(packed), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64, np.uint8])
def test_gathering_at_kept_positions_matches_boolean_indexing(dtype):
    """Rebuild and verify gather the base at the kept positions with these kernels; rows of
    every density (all-zero and all-one bytes, ragged last bytes) against NumPy."""
    from kenstream.kernels.pack import kept_index, take_at

    rng = np.random.default_rng(11)
    for shape in _SHAPES:
        for density in _DENSITIES:
            mask, packed, _, base, _ = _case(rng, shape, density, dtype)
            base.flags.writeable = False  # a read-only memory map in rebuild
            got = take_at(base, kept_index(packed, shape[1], np.count_nonzero(mask, axis=1)))
            assert got.dtype == base.dtype
            assert np.array_equal(got, base[mask]), (shape, density)


def test_kept_index_lists_the_set_bits_in_order():
    """Rebuild's positions of the kept values (flat, row-major) against np.flatnonzero."""
    from kenstream.kernels.pack import kept_index

    rng = np.random.default_rng(13)
    for shape in _SHAPES + [(3, 9), (64, 1031)]:
        for density in _DENSITIES:
            mask = rng.random(shape) < density
            packed = np.packbits(mask, axis=1, bitorder="little")
            got = kept_index(packed, shape[1], np.count_nonzero(mask, axis=1))
            assert got.dtype == np.int32
            assert np.array_equal(got, np.flatnonzero(mask)), (shape, density)


def test_kept_index_refuses_bits_that_are_not_the_row_counts():
    """A padding bit past the row's end, or counts that are not the mask's: refused, and
    every slot still holds a position inside the array (nothing is written out of it)."""
    from kenstream.kernels.pack import kept_index, put_at

    rng = np.random.default_rng(14)
    mask = rng.random((6, 13)) < 0.5
    mask[:, 0] = True
    packed = np.packbits(mask, axis=1, bitorder="little")
    counts = np.count_nonzero(mask, axis=1)
    padded = packed.copy()
    padded[2, -1] |= np.uint8(0x80)  # column 15 of a 13-column row
    shifted = counts.copy()
    shifted[1] += 1
    shifted[4] -= 1
    for bits, rows in ((padded, counts + np.eye(6, dtype=np.int64)[2]), (packed, shifted)):
        with pytest.raises(ValueError, match="do not match the row counts"):
            kept_index(bits, 13, rows)
    with pytest.raises(ValueError, match="C-contiguous"):
        put_at(np.zeros((4, 6))[:, ::2], np.zeros((4, 3)), np.zeros(0, np.int32), np.zeros(0))


def test_frame_pool_threads_run_numba_kernels_on_one_thread_each():
    """The pool is the parallelism: its threads run a kernel's parallel loop alone, while
    the caller keeps its own count."""
    import numba

    from kenstream import kernels

    want = min(2, numba.config.NUMBA_NUM_THREADS)
    with kernels.threads(want), kernels.frame_pool(2, "test-pool") as pool:
        seen = list(pool.map(lambda _: numba.get_num_threads(), range(4)))
        assert numba.get_num_threads() == want
    assert seen == [1, 1, 1, 1]
