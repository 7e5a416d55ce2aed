"""The compress plan: what happens to every fine-tune tensor, and which shard holds it.

The plan is a pure function of the two checkpoints' headers, the alignment and the
settings, so an interrupted run and its ``--resume`` agree on every shard's contents.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass

from . import dtypes
from .errors import MismatchError
from .format import encoded_sizes, rows_cols, shard_name

# Float dtypes the selection kernels read; F8 tensors are compared and stored whole.
SELECTABLE = ("F64", "F32", "F16", "BF16")


@dataclass
class Item:
    """One fine-tune tensor. ``action``: ``select`` or ``store`` (whole, if it changed)."""

    name: str
    base_name: str | None
    action: str
    reason: str
    dtype: str
    shape: list
    rows: int
    cols: int
    k: int | None
    estimate: int

    def to_json(self) -> dict:
        return asdict(self)


def make_items(ft, base, alignment, settings) -> list:
    """Decide every fine-tune tensor's fate; raises MismatchError for unrelated models."""
    items = []
    reshaped = []  # warned about only once the pair is known to be one model
    for name in ft.names():
        info = ft.info(name)
        shape = [int(d) for d in info.shape]
        rows, cols = rows_cols(shape)
        base_name = alignment.pairs.get(name)
        nbytes = int(info.nbytes)
        if base_name is None:
            items.append(Item(name, None, "store", "new", info.dtype, shape, rows, cols, None, nbytes))
            continue
        binfo = base.info(base_name)
        if list(binfo.shape) != shape:
            reshaped.append(f"{name}: shape {shape} differs from the base's "
                            f"{list(binfo.shape)}; stored whole")
            items.append(Item(name, None, "store", "reshaped", info.dtype, shape, rows, cols,
                              None, nbytes))
            continue
        if info.dtype not in SELECTABLE or binfo.dtype not in SELECTABLE:
            reason = "non-float"
        elif not settings.wants(name):
            reason = "excluded"
        else:
            k = settings.k_for(cols)
            kept = rows * min(k, cols)
            est = min(encoded_sizes(rows, cols, kept, dtypes.itemsize(info.dtype), False))
            items.append(Item(name, base_name, "select", "selected", info.dtype, shape, rows,
                              cols, k, est))
            continue
        items.append(Item(name, base_name, "store", reason, info.dtype, shape, rows, cols, None,
                          nbytes))
    matched = len(alignment.pairs)
    if matched == 0:
        raise MismatchError("no tensor name of the fine-tune matches the base", file=ft.root)
    if len(reshaped) * 2 > matched:
        raise MismatchError(f"{len(reshaped)} of {matched} matching tensors differ in shape",
                            file=ft.root)
    for message in reshaped:
        warnings.warn(message, stacklevel=2)
    return items


def fill_greedy(things, size_of, limit: int) -> list:
    """Group ``things`` in order into lists whose sizes add up to at most ``limit``; a thing
    larger than ``limit`` gets a list of its own. Always returns at least one list."""
    groups, current, filled = [], [], 0
    for thing in things:
        size = size_of(thing)
        if current and filled + size > limit:
            groups.append(current)
            current, filled = [], 0
        current.append(thing)
        filled += size
    if current or not groups:
        groups.append(current)
    return groups


def assign_shards(items, shard_size: int) -> list:
    """Diff shards: plan items in fine-tune order, filled by estimated size."""
    return fill_greedy(items, lambda item: item.estimate, shard_size)


def _fragment(name: str, dtype: str, shape, offset_bound: int) -> int:
    """Serialised length of one header entry plus its separating comma."""
    entry = {"dtype": dtype, "shape": [int(d) for d in shape],
             "data_offsets": [offset_bound, offset_bound]}
    return len(json.dumps({name: entry}, separators=(",", ":"))) - 1


def _max_bytes(item, ties: str) -> int:
    """Most bytes this item's entries can take in a shard."""
    if item.action == "store":
        return item.estimate
    itemsize = dtypes.itemsize(item.dtype)
    kept = item.rows * (item.cols if ties == "values" else min(item.k, item.cols))
    return max(encoded_sizes(item.rows, item.cols, kept, itemsize, ties == "values"))


def _entry_options(item, ties: str, bound: int) -> list:
    """Header fragment lengths of each entry set this item may write (the max is reserved)."""
    name, rows, cols = item.name, item.rows, item.cols
    if item.action == "store":
        return [_fragment(f"{name}::values", item.dtype, item.shape, bound)]
    lo = rows * min(item.k, cols)
    hi = rows * cols if ties == "values" else lo
    mask = _fragment(f"{name}::mask", "U8", [rows, (cols + 7) // 8], bound)
    index = _fragment(f"{name}::index", "U32", [hi], bound)
    counts = _fragment(f"{name}::counts", "U32", [rows], bound) if hi != lo else 0
    values = _fragment(f"{name}::values", item.dtype, [hi], bound)
    return [mask + values, index + counts + values]


def worst_record(item, shard: str, bound: int) -> dict:
    """A record at least as long, once serialised, as any this item can produce."""
    big = max(bound, item.rows * item.cols, 1000)
    return {"base_name": item.base_name, "encoding": "unchanged", "reason": "non-float",
            "dtype": item.dtype, "shape": item.shape, "rows": item.rows, "cols": item.cols,
            "k": max(item.k or 0, 1000), "kept": big, "row_kept": max(item.cols, 1000),
            "shard": shard, "nbytes": big}


def header_reserve(items, shard: str, ties: str = "positions") -> int:
    """Upper bound on the shard header's length for ``items`` (tight: slack is padding)."""
    bound = max(sum(_max_bytes(i, ties) for i in items), 1)
    total = 2 + sum(max(_entry_options(i, ties, bound)) for i in items)
    records = {i.name: worst_record(i, shard, bound) for i in items}
    meta = {"__metadata__": shard_metadata(records)}
    return total + len(json.dumps(meta, separators=(",", ":"))) - 1


def shard_metadata(records: dict) -> dict:
    return {"format": "kenstream-diff", "format_version": "1",
            "records": json.dumps(records, sort_keys=True, separators=(",", ":"))}


def shard_names(count: int) -> list:
    return [shard_name(i + 1, count) for i in range(count)]
