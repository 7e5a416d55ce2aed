"""What a diff shard holds for each tensor record, and how large its header can get.

Pure arithmetic on records and plans (docs/format.md 2.2): the entries a record implies,
the bytes of the two selected encodings, and the bound on a shard's header that lets a
writer reserve room for it before any data is written.
"""

from __future__ import annotations

import json

import numpy as np

from .. import dtypes
from . import spec
from .records import TensorRecord, shard_metadata

_UINT = {"U16": np.uint16, "U32": np.uint32}


def index_code(cols: int) -> str:
    """Dtype code of the column numbers of an ``indices`` tensor."""
    return "U16" if cols <= 65536 else "U32"


def count_code(cols: int) -> str:
    """Dtype code of the per-row counts of an ``indices`` tensor."""
    return "U16" if cols <= 65535 else "U32"


def uint_dtype(code: str) -> np.dtype:
    return np.dtype(_UINT[code])


def encoded_sizes(rows: int, cols: int, kept: int, itemsize: int, counts_vary: bool):
    """Bytes of the (bitmask, indices) encodings of a selected tensor; O(1)."""
    bitmask = rows * ((cols + 7) // 8) + kept * itemsize
    indices = kept * (uint_dtype(index_code(cols)).itemsize + itemsize)
    if counts_vary:
        indices += rows * uint_dtype(count_code(cols)).itemsize
    return bitmask, indices


def expected_entries(rec: TensorRecord) -> dict:
    """role -> (dtype code, shape list) the shard holds for ``rec`` (``counts`` is optional:
    present only when rows keep different counts)."""
    rows, cols, kept = rec.rows, rec.cols, rec.kept
    if rec.version >= 2:
        if rec.encoding == "unchanged":
            return {}
        return {"frames": ("U8", [rec.positions_bytes + rec.values_bytes]),
                "table": ("U64", [rec.frames, spec.TABLE_ROW_BYTES // 8])}
    if rec.encoding == "dense":
        return {"values": (rec.dtype, list(rec.shape))}
    if rec.encoding == "bitmask":
        return {"mask": ("U8", [rows, (cols + 7) // 8]), "values": (rec.dtype, [kept])}
    if rec.encoding == "indices":
        return {"index": (index_code(cols), [kept]), "counts": (count_code(cols), [rows]),
                "values": (rec.dtype, [kept])}
    return {}


OPTIONAL_ROLES = ("counts",)


# -- header reserve -----------------------------------------------------------------------
# ``items`` below are plan items: objects with name, base_name, action ("select" or
# "store"), dtype, shape, rows, cols, k, estimate (the bytes of a stored tensor) and, for
# format 2, frames (how many frames the tensor is cut into).


def _fragment(name: str, dtype: str, shape, offset_bound: int) -> int:
    """Serialised length of one header entry plus its separating comma."""
    entry = {"dtype": dtype, "shape": [int(d) for d in shape],
             "data_offsets": [offset_bound, offset_bound]}
    return len(json.dumps({name: entry}, separators=(",", ":"))) - 1


def max_bytes(item, ties: str) -> int:
    """Most bytes ``item``'s entries can take in a shard."""
    if item.action == "store":
        return item.estimate
    itemsize = dtypes.itemsize(item.dtype)
    kept = item.rows * (item.cols if ties == "values" else min(item.k, item.cols))
    return max(encoded_sizes(item.rows, item.cols, kept, itemsize, ties == "values"))


def _entry_options(item, ties: str, bound: int) -> list:
    """Header fragment lengths of each entry set this item may write (the max is reserved)."""
    name, rows, cols = item.name, item.rows, item.cols
    if item.action == "store":
        return [_fragment(spec.entry_name(name, "values"), item.dtype, item.shape, bound)]
    lo = rows * min(item.k, cols)
    hi = rows * cols if ties == "values" else lo
    mask = _fragment(spec.entry_name(name, "mask"), "U8", [rows, (cols + 7) // 8], bound)
    index = _fragment(spec.entry_name(name, "index"), "U32", [hi], bound)
    counts = _fragment(spec.entry_name(name, "counts"), "U32", [rows], bound) if hi != lo else 0
    values = _fragment(spec.entry_name(name, "values"), item.dtype, [hi], bound)
    return [mask + values, index + counts + values]


def worst_record(item, shard: str, bound: int, version: int = 1) -> TensorRecord:
    """A record at least as long, once serialised, as any this item can produce."""
    big = max(bound, item.rows * item.cols, 1000)
    extra = (big, big, big) if version >= 2 else (None, None, None)
    digest = "f" * 16 if version >= 2 and item.base_name is not None else None
    return TensorRecord(item.base_name, "unchanged", "non-float", item.dtype, tuple(item.shape),
                        item.rows, item.cols, max(item.k or 0, 1000), big,
                        max(item.cols, 1000), shard, big, *extra,
                        base_rows=item.base_rows if version >= 2 else None,
                        base_digest=digest, version=version)


def coded_bound(item) -> int:
    """More bytes than format 2 can ever take for ``item`` (zstd's worst-case expansion,
    every header, raw bits): used only to size header fields."""
    return item.rows * item.cols * (dtypes.itemsize(item.dtype) + 3) + 1024 * (item.frames + 1)


def header_reserve(items, shard: str, ties: str = "positions", version: int = 1,
                   bound: int | None = None) -> int:
    """Upper bound on the header length of a shard holding ``items`` (tight: slack is
    padding). ``bound`` is the largest offset to allow for (default: the most bytes the
    items can take). Cost O(len(items))."""
    if version >= 2:
        if bound is None:
            bound = max(sum(coded_bound(i) for i in items), 1)
        total = 2 + sum(_fragment(spec.entry_name(i.name, "frames"), "U8", [bound], bound)
                        + _fragment(spec.entry_name(i.name, "table"), "U64",
                                    [i.frames, spec.TABLE_ROW_BYTES // 8], bound)
                        for i in items)
    else:
        if bound is None:
            bound = max(sum(max_bytes(i, ties) for i in items), 1)
        total = 2 + sum(max(_entry_options(i, ties, bound)) for i in items)
    records = {i.name: worst_record(i, shard, bound, version) for i in items}
    meta = {"__metadata__": shard_metadata(records, version)}
    return total + len(json.dumps(meta, separators=(",", ":"))) - 1


EMPTY_HEADER = header_reserve([], spec.shard_name(1, 1))
"""Header bytes of a shard holding nothing (braces and the metadata's fixed fields)."""


def header_cost(item, ties: str = "positions", version: int = 1) -> int:
    """Most bytes ``item`` adds to any shard's header: its entries and its record, with
    every offset and count at its widest, and the comma before it. A shard holding items
    ``I`` has a header of at most ``EMPTY_HEADER + sum(header_cost(i) for i in I)``."""
    alone = header_reserve([item], spec.shard_name(1, 1), ties, version, bound=spec.MAX_COUNT)
    return alone - EMPTY_HEADER + 1
