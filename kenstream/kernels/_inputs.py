"""What the selection kernels accept, checked once for every rule.

Inputs are NumPy arrays or CPU torch tensors of float32, float64, float16 or bfloat16
(NumPy has no bfloat16: it travels as its uint16 bit pattern, and a torch bfloat16 tensor
is viewed that way). Every kernel reads rows through a little-endian uint16 view of the
bytes, so one compiled kernel serves every dtype; the ``KIND_*`` code says how to widen
them (``_rowprep.widen_row``). Seeds and salts of the rules that draw per row are
uint64 (:func:`as_u64`).
"""

from __future__ import annotations

import hashlib
import operator

import numpy as np

from ..errors import SelectionError
from ..settings import TIES
from ._rowprep import KIND_BF16, KIND_F16, KIND_F32, KIND_F64

_KINDS = {np.dtype(np.float32): KIND_F32, np.dtype(np.float64): KIND_F64,
          np.dtype(np.uint16): KIND_BF16, np.dtype(np.float16): KIND_F16}

_M64 = (1 << 64) - 1

DTYPE_HINT = "pass float32, float64, float16, or bfloat16 (a torch tensor or uint16 bits)"


def _from_torch(x, what):
    import torch

    if x.device.type != "cpu":
        raise SelectionError(f"{what} is on {x.device}; move it to the CPU first")
    x = x.detach()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype in (torch.float32, torch.float64, torch.float16):
        return x.numpy()
    raise SelectionError(f"{what} has unsupported dtype {x.dtype}", hint=DTYPE_HINT)


def as_array(x, what: str = "input") -> tuple[np.ndarray, int]:
    """(``x`` as an ndarray without a copy, its kind code); SelectionError otherwise."""
    if type(x).__module__.startswith("torch"):
        x = _from_torch(x, what)
    if isinstance(x, np.generic):  # a NumPy scalar: a 0-D array
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise SelectionError(f"{what}: expected a numpy array or torch tensor, "
                             f"got {type(x).__name__}")
    kind = _KINDS.get(x.dtype)  # byte-swapped dtypes compare unequal: refused too
    if kind is None:
        raise SelectionError(f"{what} has unsupported dtype {x.dtype}", hint=DTYPE_HINT)
    return np.asarray(x), kind


def words(x: np.ndarray) -> np.ndarray:
    """Read-only little-endian uint16 view of ``x``'s bytes, last axis widened by the
    item size. No copy when the last axis is contiguous (C arrays, row slices, memory
    maps); a copy otherwise."""
    if x.ndim and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    view = x.view(np.uint16)
    view.flags.writeable = False
    return view


def check_k(k) -> int:
    """``k`` as an int >= 1, or SelectionError."""
    if isinstance(k, (bool, np.bool_)):
        raise SelectionError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise SelectionError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise SelectionError(f"k must be at least 1, got {k}",
                             hint="k is the number of values kept per row")
    return k


def check_out(out, shape) -> np.ndarray:
    """A caller's output array, checked: writable, C-contiguous, bool, of ``shape``."""
    if out is None:
        return np.empty(shape, np.bool_)
    if (not isinstance(out, np.ndarray) or out.dtype != np.bool_ or out.shape != tuple(shape)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise SelectionError(f"out must be a writable C-contiguous bool array of shape "
                             f"{tuple(shape)}")
    return out


def as_u64(value, what):
    """A seed/salt as uint64: ints wrap mod 2**64, str/bytes hash stably (BLAKE2b-64)."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return np.uint64(int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "little"))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SelectionError(f"{what} must be an integer or a string, got {value!r}")
    return np.uint64(int(value) & _M64)


# Tie modes (docs/algorithm.md), as the kernels take them: the golden lowest position, the
# published value mask, and the lowest place in the row's scrambled order.
POSITIONS = 0
VALUES = 1
SCRAMBLED = 2
TIE_CODES = {"positions": POSITIONS, "values": VALUES, "scrambled": SCRAMBLED}


def check_ties(ties) -> str:
    """A tie mode, one of ``settings.TIES``, or SelectionError."""
    if ties not in TIES:
        raise SelectionError(f"unknown ties mode {ties!r}",
                             hint=f"use one of {', '.join(TIES)}")
    return ties


def check_row_offset(row_offset) -> int:
    """The global number of a block's first row: a non-negative int, or SelectionError."""
    if isinstance(row_offset, (bool, np.bool_)) or not isinstance(row_offset, (int, np.integer)) \
            or row_offset < 0:
        raise SelectionError(f"row_offset must be a non-negative integer, got {row_offset!r}")
    return int(row_offset)
