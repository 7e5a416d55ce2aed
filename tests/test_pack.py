"""The numba packer against NumPy's packbits and boolean indexing."""

import numpy as np
import pytest

from kenstream._pack import pack_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16, np.float64, np.int8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 17), (0, 5), (6, 64)])
def test_pack_rows_matches_numpy(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 1.0):
        mask = rng.random(shape) < density
        values = rng.integers(0, 255, size=shape).astype(dtype)
        packed, kept = pack_rows(mask, values, np.count_nonzero(mask, axis=1))
        assert np.array_equal(packed, np.packbits(mask, axis=1, bitorder="little"))
        assert kept.dtype == values.dtype
        assert np.array_equal(kept.view(np.uint8), values[mask].view(np.uint8))


def test_pack_keeps_nan_payloads_and_negative_zero():
    bits = np.array([[0x7FC00001, 0x80000000, 0xFF800000, 0x3F800000]], dtype=np.uint32)
    values = bits.view(np.float32)
    mask = np.array([[True, True, False, True]])
    _, kept = pack_rows(mask, values, np.array([3]))
    assert kept.view(np.uint32).tolist() == [0x7FC00001, 0x80000000, 0x3F800000]


def test_count_bits_matches_unpackbits():
    from kenstream.format import count_bits

    rng = np.random.default_rng(3)
    for shape in [(0, 3), (1, 1), (7, 13), (300, 41)]:
        packed = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert count_bits(packed) == int(np.unpackbits(packed).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64])
def test_unpack_into_matches_numpy(dtype):
    from kenstream._pack import unpack_into

    rng = np.random.default_rng(7)
    for shape in [(1, 1), (5, 13), (40, 64), (3, 0)]:
        mask = rng.random(shape) < 0.4
        packed = np.packbits(mask, axis=1, bitorder="little")
        values = rng.integers(0, 1000, size=int(mask.sum())).astype(dtype)
        base = rng.integers(0, 1000, size=shape).astype(dtype)
        expected = base.copy()
        expected[mask] = values
        got = base.copy()
        unpack_into(got, packed, values, np.count_nonzero(mask, axis=1))
        assert np.array_equal(got, expected)
