"""KEN row selection: which positions of a fine-tuned row keep their value.

Public API (re-exported by ``kenstream``):

* :func:`select_positions` -- the positions one row's greedy matching takes, in order;
* :func:`select_mask` -- bool masks for a row or a matrix;
* :func:`kept_counts` -- kept positions per row of a mask.

The engine calls KEN through the front door, :func:`kenstream.kernels.select`. The rule is
stated in ``docs/algorithm.md`` and pinned down bit for bit by the golden vectors in
``tests/data/golden``. Inputs are those of :mod:`kenstream.kernels._inputs`: float64 is
rounded to float32 first (the rule is a float32 rule); read-only arrays and memory maps
are read in place, one row at a time.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NonFiniteError, SelectionError
from . import _ken
from ._inputs import (TIE_CODES, as_array, as_u64, check_k, check_out, check_row_offset,
                      check_ties, words)
SERIAL_BELOW = 1 << 16  # inputs with fewer values run on the calling thread alone


def _raise_for(status: np.ndarray, k: int, row_offset: int = 0) -> None:
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    row = int(bad[0])
    if status[row] == _ken.NONFINITE:
        raise NonFiniteError("row holds a NaN or infinity (after rounding to float32)",
                             row=row_offset + row)
    raise SelectionError("row values are too large for float32 statistics "
                         "(their standard deviation or range overflows)", row=row_offset + row,
                         hint=f"k={k} < row length needs a finite bandwidth and grid")


def select_positions(row, k) -> np.ndarray:
    """Positions of ``row`` taken by KEN's greedy matching, in visiting order.

    row: 1-D array (see module docstring for dtypes); k >= 1 grid points. Returns int64
    [min(k, n)], all distinct. For k > n, grid points visited after every position is
    taken get none. Cost: O(n + k) memory, about O(n P + 16 k P) time (P ~ 11).
    Raises SelectionError (k < 1, bad dtype/shape, overflowing statistics) and
    NonFiniteError (NaN/Inf).
    """
    x, kind = as_array(row, "row")
    if x.ndim != 1:
        raise SelectionError(f"select_positions takes one row (1-D), got shape {x.shape}")
    k = check_k(k)
    status, positions, _ = _ken.positions_row(words(x), x.shape[0], kind, k, 0)
    _raise_for(np.array([status], np.uint8), k)
    return positions.astype(np.int64, copy=False)


def mask_matrix(mat: np.ndarray, kind: int, k: int, ties: str, out: np.ndarray,
                row_offset: int = 0, seed=0, salt=0) -> np.ndarray:
    """KEN masks of every row of ``mat`` [rows, cols] (already checked) into ``out``.

    Row i is global row ``row_offset + i``: errors name it, and with ``seed`` and ``salt``
    (see ``_inputs.as_u64``) it draws the row's order for ``ties="scrambled"``. Rows run
    in parallel on numba threads; inputs under `SERIAL_BELOW` values, or of one row, run
    on the calling thread alone (a single row longer than ``WIDE_ROW`` on a
    NumPy-allocated workspace, see ``_ken.numpy_workspace``).
    """
    status = np.zeros(mat.shape[0], np.uint8)
    rows, n = mat.shape
    draw = (TIE_CODES[ties], as_u64(seed, "seed"), as_u64(salt, "salt"),
            as_u64(int(row_offset), "row_offset"))
    if rows == 1 and n > _ken.WIDE_ROW:
        _ken.mask_rows_with(words(mat), kind, k, draw[0], out, status,
                            _ken.numpy_workspace(n, k), *draw[1:])
    else:
        threads = numba.get_num_threads()
        # Waking the thread pool costs more than a small input saves, and far more on a
        # busy machine (the caller spins until every worker gets a core): run those alone.
        alone = threads > 1 and (rows < 2 or mat.size < SERIAL_BELOW)
        if alone:
            numba.set_num_threads(1)
        try:
            _ken.mask_rows(words(mat), kind, k, draw[0], out, status,
                           4 * numba.get_num_threads(), *draw[1:])
        finally:
            if alone:
                numba.set_num_threads(threads)
    _raise_for(status, k, row_offset)
    return out


def select_mask(x, k, ties="positions", *, seed=0, salt=0, row_offset=0,
                out=None) -> np.ndarray:
    """KEN keep-mask of a row (1-D) or of each row of a matrix (2-D).

    ties="positions": exactly min(k, n) positions per row, the ones the greedy matching
    takes (equal distances to the lowest position: the golden rule). ties="scrambled":
    exactly min(k, n) too, equal distances to the lowest place in a per-row permutation
    of the positions drawn from (seed, salt, row_offset + row) (int mod 2**64 or str), so
    kept positions carry no column bias on rows with many equal values (bf16).
    ties="values": every position whose value equals (==) a taken value, so duplicates of
    a kept value are kept too (the published method's mask). k >= n keeps whole rows.
    out: optional C-contiguous bool array of x's shape to write into.
    Per row O(n + k) memory and about O(n P + 16 k P) time (P ~ 11). Raises
    SelectionError / NonFiniteError naming the first bad row (out may then hold partial
    results).
    """
    arr, kind = as_array(x, "input")
    if arr.ndim not in (1, 2):
        raise SelectionError(f"select_mask takes a row or a matrix, got shape {arr.shape}")
    k = check_k(k)
    check_ties(ties)
    row_offset = check_row_offset(row_offset)
    out = check_out(out, arr.shape)
    mat = arr.reshape(1, -1) if arr.ndim == 1 else arr
    mask_matrix(mat, kind, k, ties, out.reshape(mat.shape), row_offset, seed, salt)
    return out


def kept_counts(mask) -> np.ndarray:
    """Number of kept positions per row of a bool mask [..., n] -> int64 [...]."""
    return np.count_nonzero(np.asarray(mask), axis=-1).astype(np.int64)
