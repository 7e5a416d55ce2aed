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
from .io.writer import header_bytes

# Float dtypes the selection kernels read; F8 tensors are compared and stored whole.
SELECTABLE = ("F64", "F32", "F16", "BF16")
_BIG = 10**19  # wider than any byte count or shape, for header room bounds


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
    reshaped = 0
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
            reshaped += 1
            warnings.warn(f"{name}: shape {shape} differs from the base's {list(binfo.shape)}; "
                          "stored whole", stacklevel=2)
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
    if reshaped * 2 > matched:
        raise MismatchError(f"{reshaped} of {matched} matching tensors differ in shape",
                            file=ft.root)
    return items


def assign_shards(items, shard_size: int) -> list:
    """Greedy fill in fine-tune order by estimated size; returns a list of item lists."""
    shards, current, filled = [], [], 0
    for item in items:
        if current and filled + item.estimate > shard_size:
            shards.append(current)
            current, filled = [], 0
        current.append(item)
        filled += item.estimate
    if current or not shards:
        shards.append(current)
    return shards


def worst_record(item, shard: str) -> dict:
    """A record at least as long, once serialised, as any this item can produce."""
    return {"base_name": item.base_name, "encoding": "unchanged", "reason": "non-float",
            "dtype": item.dtype, "shape": item.shape, "rows": _BIG, "cols": _BIG, "k": _BIG,
            "kept": _BIG, "row_kept": _BIG, "shard": shard, "nbytes": _BIG}


def header_reserve(items, shard: str) -> int:
    """Upper bound on the shard header's length for ``items``."""
    entries, records = {}, {}
    for item in items:
        for role, dtype in (("mask", "U8"), ("index", "U32"), ("counts", "U32"),
                            ("values", item.dtype)):
            shape = item.shape if role == "values" else [_BIG, _BIG]
            entries[f"{item.name}::{role}"] = (dtype, shape + [_BIG], _BIG, _BIG)
        records[item.name] = worst_record(item, shard)
    meta = shard_metadata(records)
    return len(header_bytes(entries, meta))


def shard_metadata(records: dict) -> dict:
    return {"format": "kenstream-diff", "format_version": "1",
            "records": json.dumps(records, sort_keys=True, separators=(",", ":"))}


def shard_names(count: int) -> list:
    return [shard_name(i + 1, count) for i in range(count)]
