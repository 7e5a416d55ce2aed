"""The base digest kernel (docs/format.md 6.7) against the plain reader's word-by-word
sum, for every width, padded rows and any cut into blocks."""

from __future__ import annotations

import numpy as np
import pytest

from kenstream.kernels import digest
from tests.format.reference_v2 import base_digest


@pytest.mark.parametrize("dtype, cols", [(np.uint8, 13), (np.uint16, 8), (np.uint16, 7),
                                         (np.float32, 6), (np.float32, 5), (np.float64, 3),
                                         (np.float32, 0)])
def test_digest_is_the_documented_sum(dtype, cols):
    rng = np.random.default_rng(cols)
    rows = rng.integers(0, 255, (9, cols * np.dtype(dtype).itemsize), np.uint8).view(dtype)
    for row0 in (0, 5, 1 << 33):
        assert f"{digest.rows_digest(rows, row0):016x}" == base_digest(rows, row0)


def test_blocks_add_up_in_any_order_and_from_any_thread():
    rows = np.random.default_rng(1).standard_normal((40, 11)).astype(np.float32)
    whole = digest.rows_digest(rows, 0)
    acc = digest.Digest()
    for r0, r1 in [(30, 40), (0, 7), (7, 30)]:
        acc.add(rows[r0:r1], r0)
    assert acc.value == whole


def test_any_change_of_a_word_or_of_the_order_changes_it():
    rows = np.arange(64, dtype=np.uint16).reshape(8, 8)
    whole = digest.rows_digest(rows, 0)
    changed = rows.copy()
    changed[5, 3] ^= 1
    assert digest.rows_digest(changed, 0) != whole
    swapped = rows[[1, 0, *range(2, 8)]]
    assert digest.rows_digest(swapped, 0) != whole
    assert digest.rows_digest(rows, 1) != whole  # the same rows at another place
