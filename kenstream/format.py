"""The diff's per-tensor encodings (docs/format.md, section 2).

No I/O here (the bit packing is a numba kernel, `_pack`): `encode` turns a row mask and the fine-tuned rows into the entries a shard
stores, `apply_rows` writes stored values back over base rows. Arrays are in storage dtype
(BF16 travels as uint16 bits), so every value is copied bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._pack import pack_rows

FORMAT = "kenstream-diff"
FORMAT_VERSION = 1
INDEX_NAME = "kenstream-diff.json"
PARTIAL_NAME = "kenstream-diff.partial.json"
SHARD_SUFFIX = ".kdiff"
TEMP_SUFFIX = ".partial"

ENCODINGS = ("bitmask", "indices", "dense", "unchanged")

# Rows are applied in blocks so that unpacking a mask never materialises a whole
# embedding-sized boolean matrix at once.
_APPLY_BLOCK_ELEMS = 1 << 24


def shard_name(number: int, total: int) -> str:
    return f"kendiff-{number:05d}-of-{total:05d}{SHARD_SUFFIX}"


def rows_cols(shape) -> tuple[int, int]:
    """Rows and columns a tensor of ``shape`` is selected as (format.md 2.1)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def index_code(cols: int) -> str:
    return "U16" if cols <= 65536 else "U32"


def count_code(cols: int) -> str:
    return "U16" if cols <= 65535 else "U32"


_UINT = {"U16": np.uint16, "U32": np.uint32}


def encoded_sizes(rows: int, cols: int, kept: int, itemsize: int, counts_vary: bool):
    """Bytes of (bitmask, indices) encodings of a selected tensor; O(1)."""
    bitmask = rows * ((cols + 7) // 8) + kept * itemsize
    indices = kept * (_UINT[index_code(cols)]().itemsize + itemsize)
    if counts_vary:
        indices += rows * _UINT[count_code(cols)]().itemsize
    return bitmask, indices


@dataclass(frozen=True)
class Entry:
    """One shard entry: ``role`` is the suffix after ``::``; ``data`` a C-contiguous array."""

    role: str
    dtype: str
    shape: tuple
    data: np.ndarray


@dataclass(frozen=True)
class Encoded:
    encoding: str
    kept: int
    row_kept: int | None
    entries: tuple

    @property
    def nbytes(self) -> int:
        return sum(e.data.nbytes for e in self.entries)


def encode(mask: np.ndarray, ft_rows: np.ndarray, dtype: str, *, parallel=True) -> Encoded:
    """Encode the kept values of ``ft_rows`` [rows, cols] selected by bool ``mask`` [rows, cols].

    Picks the smaller of bitmask and indices (bitmask on a tie). Cost O(rows * cols) and
    memory of the kept values plus one row-count vector.
    """
    rows, cols = mask.shape
    counts = np.count_nonzero(mask, axis=1)
    kept = int(counts.sum())
    counts_vary = bool(rows > 0 and (counts != counts[0]).any())
    row_kept = None if counts_vary or rows == 0 else int(counts[0])
    bitmask, indices = encoded_sizes(rows, cols, kept, ft_rows.itemsize, counts_vary)
    if bitmask <= indices:
        packed, values = pack_rows(mask, ft_rows, counts, parallel=parallel)
        entries = (
            Entry("mask", "U8", (rows, (cols + 7) // 8), packed),
            Entry("values", dtype, (kept,), values),
        )
        return Encoded("bitmask", kept, row_kept, entries)
    icode = index_code(cols)
    columns = np.nonzero(mask)[1].astype(_UINT[icode])
    values = np.ascontiguousarray(ft_rows[mask])
    entries = [Entry("index", icode, (kept,), columns)]
    if counts_vary:
        ccode = count_code(cols)
        entries.append(Entry("counts", ccode, (rows,), counts.astype(_UINT[ccode])))
    entries.append(Entry("values", dtype, (kept,), values))
    return Encoded("indices", kept, row_kept, tuple(entries))


def dense(ft: np.ndarray, dtype: str, shape) -> Encoded:
    """The whole fine-tuned tensor, stored as is."""
    data = np.ascontiguousarray(ft).reshape(-1)
    return Encoded("dense", data.size, None, (Entry("values", dtype, tuple(shape), data),))


def unchanged() -> Encoded:
    return Encoded("unchanged", 0, None, ())


def apply_rows(out: np.ndarray, record: dict, entries: dict) -> None:
    """Overwrite kept positions of ``out`` [rows, cols] (base, writable) with stored values.

    ``entries`` maps role -> array as read from the shard. Works through row blocks so
    extra memory stays near ``_APPLY_BLOCK_ELEMS`` booleans.
    """
    encoding = record["encoding"]
    if encoding == "unchanged":
        return
    values = entries["values"].reshape(-1)
    if encoding == "dense":
        out.reshape(-1)[:] = values
        return
    rows, cols = out.shape
    block = max(1, _APPLY_BLOCK_ELEMS // max(cols, 1))
    if encoding == "bitmask":
        packed = entries["mask"]
        start = 0
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            mask = np.unpackbits(packed[r0:r1], axis=1, count=cols, bitorder="little").view(bool)
            n = int(np.count_nonzero(mask))
            out[r0:r1][mask] = values[start:start + n]
            start += n
        return
    index = entries["index"].astype(np.int64)
    if "counts" in entries:
        counts = entries["counts"].astype(np.int64)
    else:
        counts = np.full(rows, record["row_kept"] or 0, dtype=np.int64)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
    out.reshape(-1)[row_of * cols + index] = values


def kept_rows(record: dict, entries: dict, r0: int, r1: int) -> np.ndarray:
    """Bool [r1 - r0, cols]: which positions of rows r0..r1 come from the diff.

    Cost O((r1 - r0) * cols) plus, for ``indices``, one cumulative sum over the row counts.
    """
    rows, cols = int(record["rows"]), int(record["cols"])
    r0, r1 = max(0, r0), min(rows, r1)
    encoding = record["encoding"]
    if encoding == "dense":
        return np.ones((r1 - r0, cols), dtype=bool)
    if encoding == "unchanged":
        return np.zeros((r1 - r0, cols), dtype=bool)
    if encoding == "bitmask":
        packed = entries["mask"].reshape(rows, -1)[r0:r1]
        return np.unpackbits(packed, axis=1, count=cols, bitorder="little").view(bool)
    if "counts" in entries:
        counts = entries["counts"].astype(np.int64)
    else:
        counts = np.full(rows, record["row_kept"] or 0, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    out = np.zeros((r1 - r0, cols), dtype=bool)
    index = entries["index"][offsets[r0]:offsets[r1]].astype(np.int64)
    row_of = np.repeat(np.arange(r1 - r0, dtype=np.int64), counts[r0:r1])
    out[row_of, index] = True
    return out
