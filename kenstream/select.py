"""KEN row selection: which positions of a fine-tuned row keep their value.

Public API (re-exported by ``kenstream``):

* :func:`select_positions` -- the positions one row's greedy matching takes, in order;
* :func:`select_mask` -- bool masks for a row or a matrix (the engine's entry point);
* :func:`kept_counts` -- kept positions per row of a mask.

The rule is specified bit for bit in ``shared/golden/README.md`` and explained in
``docs/algorithm.md``. Accepted inputs: numpy float32, float64 (rounded to float32
first: the rule is a float32 rule), float16, uint16 (always read as bfloat16 bits), and
torch CPU tensors of those float dtypes or bfloat16. Read-only arrays and ``np.memmap``
are read in place, one row at a time, through a uint16 view of their bytes (so one
compiled kernel serves every dtype; little-endian hosts, as numba's are); only a matrix
whose last axis is strided is copied first.
"""

from __future__ import annotations

import operator

import numba
import numpy as np

from . import _ken
from ._rowprep import KIND_BF16, KIND_F16, KIND_F32, KIND_F64
from .errors import NonFiniteError, SelectionError

TIES = ("positions", "values")
SERIAL_BELOW = 1 << 16  # inputs with fewer values run on the calling thread alone


def _from_torch(x):
    import torch

    if x.device.type != "cpu":
        raise SelectionError(f"tensor is on {x.device}; move it to the CPU first")
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype in (torch.float32, torch.float64, torch.float16):
        return x.numpy()
    raise SelectionError(f"unsupported tensor dtype {x.dtype}",
                         hint="KEN selects float32, float64, float16 or bfloat16 rows")


_KINDS = {np.dtype(np.float32): KIND_F32, np.dtype(np.float64): KIND_F64,
          np.dtype(np.uint16): KIND_BF16, np.dtype(np.float16): KIND_F16}


def _as_input(x):
    """(x as an ndarray, its kind code); raises SelectionError for anything else."""
    if type(x).__module__.startswith("torch"):
        x = _from_torch(x)
    if not isinstance(x, np.ndarray):
        raise SelectionError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
    kind = _KINDS.get(x.dtype)  # byte-swapped dtypes compare unequal: rejected too
    if kind is None:
        raise SelectionError(f"unsupported dtype {x.dtype}",
                             hint="pass float32, float64, float16, bfloat16 (as uint16 bits)")
    return np.asarray(x), kind


def _words(x: np.ndarray) -> np.ndarray:
    """Read-only little-endian uint16 view of x (one kernel compile serves every dtype).

    No copy when the last axis is contiguous (C arrays, row slices, memmaps); a copy
    otherwise.
    """
    if x.ndim and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    words = x.view(np.uint16)
    words.flags.writeable = False
    return words


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)):
        raise SelectionError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise SelectionError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise SelectionError(f"k must be at least 1, got {k}",
                             hint="k is the number of KDE grid points per row")
    return k


def _raise_for(status: np.ndarray, k: int) -> None:
    bad = np.flatnonzero(status)
    if bad.size == 0:
        return
    row = int(bad[0])
    if status[row] == _ken.NONFINITE:
        raise NonFiniteError("row holds a NaN or infinity (after rounding to float32)",
                             row=row)
    raise SelectionError("row values are too large for float32 statistics "
                         "(their standard deviation or range overflows)", row=row,
                         hint=f"k={k} < row length needs a finite bandwidth and grid")


def select_positions(row, k) -> np.ndarray:
    """Positions of ``row`` taken by KEN's greedy matching, in visiting order.

    row: 1-D array (see module docstring for dtypes); k >= 1 grid points. Returns int64
    [min(k, n)], all distinct. For k > n, grid points visited after every position is
    taken get none. Cost: O(n + k) memory, about O(n P + 16 k P) time (P ~ 11).
    Raises SelectionError (k < 1, bad dtype/shape, overflowing statistics) and
    NonFiniteError (NaN/Inf).
    """
    x, kind = _as_input(row)
    if x.ndim != 1:
        raise SelectionError(f"select_positions takes one row (1-D), got shape {x.shape}")
    k = _check_k(k)
    status, positions, _ = _ken.positions_row(_words(x), x.shape[0], kind, k, 0)
    _raise_for(np.array([status], np.uint8), k)
    return positions.astype(np.int64, copy=False)


def select_mask(x, k, ties="positions", *, out=None) -> np.ndarray:
    """KEN keep-mask of a row (1-D) or of each row of a matrix (2-D).

    ties="positions": exactly min(k, n) positions per row, the ones the greedy matching
    takes. ties="values": every position whose value equals (==) a taken value, so
    duplicates of a kept value are kept too (the published method's mask). k >= n keeps
    whole rows. out: optional C-contiguous bool array of x's shape to write into.
    Rows run in parallel on numba threads (inputs under 65536 values or of one row on
    the calling thread); per row O(n + k) memory and about
    O(n P + 16 k P) time (P ~ 11). Raises SelectionError / NonFiniteError naming the
    first bad row (out may then hold partial results).
    """
    arr, kind = _as_input(x)
    if arr.ndim not in (1, 2):
        raise SelectionError(f"select_mask takes a row or a matrix, got shape {arr.shape}")
    k = _check_k(k)
    if ties not in TIES:
        raise SelectionError(f"unknown ties mode {ties!r}", hint="use 'positions' or 'values'")
    if out is None:
        out = np.empty(arr.shape, np.bool_)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.bool_ or out.shape != arr.shape
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise SelectionError(f"out must be a writable C-contiguous bool array of shape "
                             f"{arr.shape}")
    mat = arr.reshape(1, -1) if arr.ndim == 1 else arr
    status = np.zeros(mat.shape[0], np.uint8)
    threads = numba.get_num_threads()
    # Waking the thread pool costs more than a small input saves, and far more on a
    # busy machine (the caller spins until every worker gets a core): run those alone.
    alone = threads > 1 and (mat.shape[0] < 2 or mat.size < SERIAL_BELOW)
    if alone:
        numba.set_num_threads(1)
    try:
        _ken.mask_rows(_words(mat), kind, k, ties == "values", out.reshape(mat.shape),
                       status, 4 * numba.get_num_threads())
    finally:
        if alone:
            numba.set_num_threads(threads)
    _raise_for(status, k)
    return out


def kept_counts(mask) -> np.ndarray:
    """Number of kept positions per row of a bool mask [..., n] -> int64 [...]."""
    return np.count_nonzero(np.asarray(mask), axis=-1).astype(np.int64)
