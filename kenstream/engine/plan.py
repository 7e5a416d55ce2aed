"""The compress plan: what happens to every fine-tune tensor, and which shard holds it.

The plan is a pure function of the two checkpoints' headers, the alignment and the
settings, so an interrupted run and its ``--resume`` agree on every shard's contents.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .. import dtypes
from ..errors import MismatchError
from ..format import spec
from ..format.layout import EMPTY_HEADER, encoded_sizes, header_cost
from ..io import safetensors_file
from ..io.writer import ShardSet, header_budget

# Float dtypes the selection kernels read; F8 tensors are compared and stored whole.
SELECTABLE = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Item:
    """One fine-tune tensor. ``action``: ``select`` or ``store`` (whole, if it changed);
    ``estimate``: the most bytes its entries take (the raw size of a stored tensor)."""

    name: str
    base_name: str | None
    action: str
    reason: str
    dtype: str
    shape: tuple
    k: int | None
    estimate: int

    @property
    def rows(self) -> int:
        return spec.rows_cols(self.shape)[0]

    @property
    def cols(self) -> int:
        return spec.rows_cols(self.shape)[1]

    @property
    def params(self) -> int:
        return self.rows * self.cols


def make_items(ft, base, alignment, settings) -> list:
    """Decide every fine-tune tensor's fate; raises MismatchError for unrelated models."""
    items = []
    reshaped = []  # warned about only once the pair is known to be one model
    for name in ft.names():
        info = ft.info(name)
        shape = tuple(int(d) for d in info.shape)
        rows, cols = spec.rows_cols(shape)
        base_name = alignment.pairs.get(name)
        nbytes = int(info.nbytes)

        def store(reason, base_name=base_name):
            items.append(Item(name, base_name, "store", reason, info.dtype, shape, None, nbytes))

        if base_name is None:
            store("new")
            continue
        binfo = base.info(base_name)
        if tuple(binfo.shape) != shape:
            reshaped.append(f"{name}: shape {list(shape)} differs from the base's "
                            f"{list(binfo.shape)}; stored whole")
            store("reshaped", None)
        elif info.dtype not in SELECTABLE or binfo.dtype not in SELECTABLE:
            store("non-float")
        elif not settings.wants(name):
            store("excluded")
        else:
            k = settings.k_for(cols)
            kept = rows * min(k, cols)
            est = min(encoded_sizes(rows, cols, kept, dtypes.itemsize(info.dtype), False))
            items.append(Item(name, base_name, "select", "selected", info.dtype, shape, k, est))
    matched = len(alignment.pairs)
    if matched == 0:
        raise MismatchError("no tensor name of the fine-tune matches the base", file=ft.root)
    if len(reshaped) * 2 > matched:
        raise MismatchError(f"{len(reshaped)} of {matched} matching tensors differ in shape",
                            file=ft.root)
    for message in reshaped:
        warnings.warn(message, stacklevel=2)
    return items


def plan_shards(out, items, shard_size: int, ties: str = "positions",
                header_limit: int | None = None) -> ShardSet:
    """Diff shards: plan items in fine-tune order, filled by estimated size and by header
    size, so that no shard's header passes ``header_limit`` (default: the reader's
    ``MAX_HEADER_BYTES``; a shard of ~276k tensors would). Cost O(len(items))."""
    if header_limit is None:
        header_limit = safetensors_file.MAX_HEADER_BYTES  # looked up now: tests lower it
    cost, budget = header_budget(header_limit, EMPTY_HEADER, lambda item: item.name,
                                 lambda item: header_cost(item, ties))
    return ShardSet.plan(out, items, lambda item: item.estimate, shard_size,
                         lambda i, n: spec.shard_name(i + 1, n), cost, budget)
