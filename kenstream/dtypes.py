"""The safetensors dtype codes kenstream understands, and how each is stored in NumPy.

A code such as ``"BF16"`` names an element type in a safetensors header. NumPy has no
bfloat16 or float8, so those are held as raw bits: BF16 as ``uint16``, ``F8_*`` as
``uint8``. Every array that the readers hand out uses this *storage* dtype, which keeps
reads exact (no rounding anywhere) and lets a diff copy bits verbatim.

torch is imported lazily, only by the functions that need it, so reading a
safetensors file never pays torch's import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kenstream.errors import CheckpointError


@dataclass(frozen=True)
class DType:
    """One safetensors element type.

    ``storage`` is the NumPy dtype the bytes are viewed as; ``itemsize`` is bytes per
    element; ``is_float`` is true for the floating codes (whose storage may be integer
    bits); ``torch_name`` is the attribute of ``torch`` for the logical type.
    """

    code: str
    storage: np.dtype
    itemsize: int
    is_float: bool
    torch_name: str


def _entry(code: str, storage: str, is_float: bool, torch_name: str) -> DType:
    # Safetensors is little-endian on disk, so storage dtypes are little-endian too
    # (native on every host kenstream targets; the readers view file bytes directly).
    dt = np.dtype(storage).newbyteorder("<")
    return DType(code, dt, dt.itemsize, is_float, torch_name)


_TABLE: dict[str, DType] = {
    d.code: d
    for d in (
        _entry("F64", "float64", True, "float64"),
        _entry("F32", "float32", True, "float32"),
        _entry("F16", "float16", True, "float16"),
        _entry("BF16", "uint16", True, "bfloat16"),
        _entry("F8_E4M3", "uint8", True, "float8_e4m3fn"),
        _entry("F8_E5M2", "uint8", True, "float8_e5m2"),
        _entry("I64", "int64", False, "int64"),
        _entry("I32", "int32", False, "int32"),
        _entry("I16", "int16", False, "int16"),
        _entry("I8", "int8", False, "int8"),
        _entry("U64", "uint64", False, "uint64"),
        _entry("U32", "uint32", False, "uint32"),
        _entry("U16", "uint16", False, "uint16"),
        _entry("U8", "uint8", False, "uint8"),
        _entry("BOOL", "bool", False, "bool"),
    )
}

CODES: tuple[str, ...] = tuple(_TABLE)
"""Every supported code, widest floats first."""


def lookup(code: str) -> DType:
    """The :class:`DType` for ``code``; an unknown code raises ``CheckpointError``."""
    try:
        return _TABLE[code]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"unsupported dtype {code!r}", hint="supported: " + ", ".join(CODES)
        ) from None


def storage_dtype(code: str) -> np.dtype:
    """NumPy dtype the bytes of ``code`` are viewed as (BF16 -> uint16, F8_* -> uint8)."""
    return lookup(code).storage


def itemsize(code: str) -> int:
    """Bytes per element of ``code``."""
    return lookup(code).itemsize


def is_float(code: str) -> bool:
    """Whether ``code`` is a floating type (including BF16 and F8, stored as bits)."""
    return lookup(code).is_float


def torch_dtype(code: str):
    """The logical ``torch.dtype`` of ``code`` (BF16 -> torch.bfloat16). Imports torch."""
    import torch

    return getattr(torch, lookup(code).torch_name)


def torch_storage(code: str):
    """A ``torch.dtype`` of the same width that ``Tensor.numpy()`` accepts.

    ``tensor.view(torch_storage(code)).numpy().view(storage_dtype(code))`` gives the
    exact bits without a copy; signed types stand in for BF16/U16/U32/U64 because
    NumPy conversion of torch's unsigned wide types is not available on every version.
    """
    import torch

    bits = {"BF16": torch.int16, "U16": torch.int16, "U32": torch.int32, "U64": torch.int64,
            "F8_E4M3": torch.uint8, "F8_E5M2": torch.uint8}
    return bits.get(code) or torch_dtype(code)


def to_torch(arr: np.ndarray, code: str):
    """A CPU ``torch.Tensor`` of logical dtype ``code`` holding ``arr``'s bits (same shape).

    Shares memory with ``arr`` when it is writeable and C-contiguous; otherwise copies
    once (torch assumes tensors are writeable, and would warn on a read-only buffer).
    """
    import torch

    entry = lookup(code)
    if arr.dtype != entry.storage:
        raise ValueError(f"array of dtype {arr.dtype} is not stored as {code} ({entry.storage})")
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = arr.copy(order="C")
    carrier = torch.empty(0, dtype=torch_storage(code)).numpy().dtype
    return torch.from_numpy(arr.view(carrier)).view(torch_dtype(code))


def from_torch(dtype) -> str:
    """The code for a ``torch.dtype``; a type with no code raises ``CheckpointError``."""
    name = str(dtype).removeprefix("torch.")
    for entry in _TABLE.values():
        if entry.torch_name == name:
            return entry.code
    raise CheckpointError(
        f"unsupported torch dtype {name!r}", hint="supported: " + ", ".join(CODES)
    )


def _f8_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    # Decode all 256 codes once in float64 (exact for these tiny formats), then narrow
    # to float32, which is also exact because every f8 value is a float32 value.
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    frac = man / float(1 << man_bits)
    normal = sign * (1.0 + frac) * np.exp2(exp - bias)
    subnormal = sign * frac * np.exp2(1 - bias)
    out = np.where(exp == 0, subnormal, normal)
    top = exp == (1 << exp_bits) - 1
    if ieee_specials:  # E5M2: all-ones exponent is inf (mantissa 0) or NaN
        out = np.where(top & (man == 0), sign * np.inf, out)
        out = np.where(top & (man != 0), np.nan, out)
    else:  # E4M3FN: no infinities; only all-ones exponent with all-ones mantissa is NaN
        out = np.where(top & (man == (1 << man_bits) - 1), np.nan, out)
    return out.astype(np.float32)


_F8 = {
    "F8_E4M3": _f8_table(4, 3, 7, ieee_specials=False),
    "F8_E5M2": _f8_table(5, 2, 15, ieee_specials=True),
}


def widen_to_f32(arr: np.ndarray, code: str) -> np.ndarray:
    """Exact float32 values of ``arr`` (any shape, storage dtype of ``code``).

    F32 is returned as is (no copy); F16 via ``astype``; BF16 by shifting the 16 bits
    into the top half of a float32; F8_* through a 256-entry table. Every result is
    the exact value (float32 holds all of these). F64 and integer codes raise
    ``CheckpointError``: no exact float32 form exists. Cost: one pass and one new
    float32 array of ``arr.size`` elements (none for F32). Meant for small uses; the
    selection kernel widens row by row itself.
    """
    entry = lookup(code)
    if not entry.is_float or code == "F64":
        raise CheckpointError(f"dtype {code} has no exact float32 form")
    if arr.dtype != entry.storage:
        raise ValueError(f"array of dtype {arr.dtype} is not stored as {code} ({entry.storage})")
    if code == "F32":
        return arr
    if code == "F16":
        return arr.astype(np.float32)
    if code == "BF16":
        return (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return _F8[code][arr]


_NUMPY_FLOATS = ("F64", "F32", "F16", "BF16")


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    # Round to nearest, ties to even, on the raw bits: add 0x7FFF plus the lowest kept
    # bit, then drop the low half; +-inf and overflow come out as +-inf by the same
    # carry. NaN becomes 0x7FC0, torch's scalar rule (its vectorized CPU path writes
    # 0xFFFF instead, so NaN bits are the one place torch itself is not consistent).
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
               >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def convert(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``arr`` (storage of ``src``, any shape) cast to ``dst``, returned in dst's storage.

    Rounds as ``torch.Tensor.to`` does (nearest, ties to even; torch narrows F64 to F16
    and BF16 through float32, and so does this). ``src == dst`` returns ``arr`` itself. Among
    F64/F32/F16/BF16 the cast is done in NumPy with no copy of the input; casts that
    involve F8 or integer/bool codes go through torch on a copy. Cost: one pass, a new
    array of ``arr.size`` elements of ``dst``, float32 temporaries.
    """
    s_entry, d_entry = lookup(src), lookup(dst)
    if arr.dtype != s_entry.storage:
        raise ValueError(f"array of dtype {arr.dtype} is not stored as {src} ({s_entry.storage})")
    if src == dst:
        return arr
    if src in _NUMPY_FLOATS and dst in _NUMPY_FLOATS:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the cast's meaning
            if src == "F64" and dst == "F64":
                return arr
            if dst == "F64":
                return widen_to_f32(arr, src).astype(np.float64)
            # torch narrows F64 through float32 (double rounding included); match it.
            f32 = arr.astype(np.float32) if src == "F64" else widen_to_f32(arr, src)
            if dst == "BF16":
                return _f32_to_bf16_bits(f32)
            return f32.astype(d_entry.storage)
    tensor = to_torch(arr, src).to(torch_dtype(dst))
    return tensor.view(torch_storage(dst)).numpy().view(d_entry.storage)


def cast_overflows(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Bool mask of ``arr`` (storage of ``src``): the finite values that :func:`convert`
    to ``dst`` makes infinite (out of ``dst``'s range). Float codes only. O(n), float32
    or float64 temporaries."""
    def values(a, code):
        return a if code == "F64" else widen_to_f32(a, code)

    return np.isfinite(values(arr, src)) & ~np.isfinite(values(convert(arr, src, dst), dst))
