"""The diff's per-tensor encodings (docs/format.md, section 2).

No I/O here: `tail_entries` chooses a selected tensor's encoding and builds the entries that
follow its values, `apply_block` / `apply_rows` write stored values back over base rows (the
bit scatter is a numba kernel in `_pack`). Arrays are in storage dtype
(BF16 travels as uint16 bits), so every value is copied bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._pack import merge_into, row_popcounts

FORMAT = "kenstream-diff"
FORMAT_VERSION = 1
INDEX_NAME = "kenstream-diff.json"
PARTIAL_NAME = "kenstream-diff.partial.json"
SHARD_SUFFIX = ".kdiff"
TEMP_SUFFIX = ".partial"

ENCODINGS = ("bitmask", "indices", "dense", "unchanged")

# Tensors are worked through in row blocks of about this many parameters, so no
# embedding-sized temporary (a boolean mask, a rebuilt tensor) is ever made whole.
BLOCK_ELEMS = 1 << 23


def shard_name(number: int, total: int) -> str:
    return f"kendiff-{number:05d}-of-{total:05d}{SHARD_SUFFIX}"


def row_blocks(rows: int, cols: int):
    """(r0, r1) ranges of about `BLOCK_ELEMS` parameters (at least one row each)."""
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)
    if rows == 0:
        yield 0, 0


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


def count_bits(packed: np.ndarray) -> int:
    """Number of set bits in a packed mask (padding bits included, which must be 0).

    Row by row with the parallel popcount kernel; memory is one count per row.
    """
    if packed.ndim != 2:
        packed = packed.reshape(1, -1)
    return int(row_popcounts(packed).sum())


def tail_entries(packed: np.ndarray, counts: np.ndarray, cols: int, itemsize: int):
    """Choose the encoding of a selected tensor from its packed mask; returns
    ``(encoding, row_kept, entries)`` with the entries that follow ``values``.

    ``packed`` is the uint8 [rows, ceil(cols/8)] bitmask, ``counts`` the kept count of each
    row. Bitmask unless indices are strictly smaller; cost O(rows * cols / 8), plus the
    column list when indices win (then fewer than 1 in 16 positions are kept).
    """
    rows = counts.size
    kept = int(counts.sum())
    counts_vary = bool(rows > 0 and (counts != counts[0]).any())
    row_kept = None if counts_vary or rows == 0 else int(counts[0])
    bitmask, indices = encoded_sizes(rows, cols, kept, itemsize, counts_vary)
    if bitmask <= indices:
        return "bitmask", row_kept, (Entry("mask", "U8", (rows, (cols + 7) // 8), packed),)
    icode = index_code(cols)
    block = max(1, BLOCK_ELEMS // max(cols, 1))
    columns = np.empty(kept, dtype=_UINT[icode])
    at = 0
    for r0 in range(0, rows, block):
        mask = np.unpackbits(packed[r0:r0 + block], axis=1, count=cols, bitorder="little")
        cols_here = np.nonzero(mask)[1]
        columns[at:at + cols_here.size] = cols_here
        at += cols_here.size
    entries = [Entry("index", icode, (kept,), columns)]
    if counts_vary:
        ccode = count_code(cols)
        entries.append(Entry("counts", ccode, (rows,), counts.astype(_UINT[ccode])))
    return "indices", row_kept, tuple(entries)


def apply_rows(out: np.ndarray, record: dict, entries: dict) -> None:
    """Overwrite kept positions of ``out`` [rows, cols] (base, writable) with stored values.

    ``entries`` maps role -> array as read from the shard. Works through row blocks so
    extra memory stays near ``BLOCK_ELEMS`` booleans.
    """
    start = 0
    for r0, r1 in row_blocks(*out.shape):
        start = apply_block(out[r0:r1], record, entries, r0, start)


def apply_block(out: np.ndarray, record: dict, entries: dict, r0: int, start: int) -> int:
    """Overwrite kept positions of rows ``r0 : r0 + len(out)`` held in ``out`` [n, cols].

    ``start`` is the index in ``values`` of the block's first kept value (0 for the first
    block; pass back what the previous call returned). Returns the next block's start.
    """
    encoding = record["encoding"]
    if encoding == "unchanged":
        return start
    n, cols = out.shape
    values = entries["values"].reshape(-1)
    if encoding == "dense":
        out[:] = values[r0 * cols:(r0 + n) * cols].reshape(n, cols)
        return start + n * cols
    if encoding == "bitmask":
        return _merge_bitmask(out, out, record, entries, r0, start)
    if "counts" in entries:
        counts = entries["counts"][r0:r0 + n].astype(np.int64)
    else:
        counts = np.full(n, record["row_kept"] or 0, dtype=np.int64)
    kept = int(counts.sum())
    index = entries["index"][start:start + kept].astype(np.int64)
    row_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    out.reshape(-1)[row_of * cols + index] = values[start:start + kept]
    return start + kept


def build_block(out: np.ndarray, base: np.ndarray, record: dict, entries: dict, r0: int,
                start: int) -> int:
    """`apply_block` over a copy of ``base`` rows [n, cols] (already in ``out``'s dtype):
    writes the rebuilt rows into ``out`` and returns the next block's ``start``.

    For ``bitmask`` the copy and the overwrite are one parallel pass (`merge_into`).
    """
    if record["encoding"] != "bitmask":
        np.copyto(out, base)
        return apply_block(out, record, entries, r0, start)
    return _merge_bitmask(out, base, record, entries, r0, start)


def _merge_bitmask(out, base, record, entries, r0, start) -> int:
    """``out`` = ``base`` rows (may be ``out``) with a bitmask block's kept values over them."""
    packed = entries["mask"].reshape(int(record["rows"]), -1)[r0:r0 + out.shape[0]]
    counts = row_popcounts(packed)
    kept = int(counts.sum())
    values = entries["values"].reshape(-1)
    merge_into(out, base, packed, values[start:start + kept], counts)
    return start + kept


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
