"""The compress loop of one diff shard, streaming in row blocks.

Part of the engine (it joins the readers, the kernels and the writer). Every tensor goes
through in row blocks: the main thread selects block b+1 with the parallel kernel while
the format's sink (:mod:`.sink_v2`, or :mod:`.sink_v1` for format 1) codes and writes
block b on other threads and releases its input pages. Resident memory is therefore a
few blocks, whatever the size of the largest tensor or of the model.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes, kernels
from ..errors import KenstreamError
from ..format import spec
from ..format.layout import header_reserve
from ..io.rows import TensorRows, identical
from ..kernels.digest import Digest
from .budget import Cutter
from .plan import base_rows, cast_overflow_error, selection_error, tensor_salt
from .sink_v1 import V1Sink
from .sink_v2 import V2Sink


def make_sink(writer, shard, progress, *, version, block_elems, level, frame_elems, threads):
    if version == 1:
        return V1Sink(writer, shard, progress, block_elems)
    return V2Sink(writer, shard, progress, block_elems, level=level, frame_elems=frame_elems,
                  threads=threads)


def write_shard(shards, shard: str, items, ft, base, settings, progress, *, version: int,
                block_elems: int = spec.DEFAULT_BLOCK_ELEMS, level: int = spec.DEFAULT_LEVEL,
                frame_elems: int = spec.DEFAULT_FRAME_ELEMS, threads: int = 1,
                cuts: dict | None = None) -> dict:
    """Write diff shard ``shard`` of ``shards`` (a ShardSet) for plan ``items`` in format
    ``version``; returns their records (name -> TensorRecord). ``cuts``: a tensor or
    global budget's cut of each tensor (:mod:`.budget`), None for the row budget."""
    writer = shards.open(shard, header_reserve(items, shard, settings.ties, version))
    with writer:
        sink = make_sink(writer, shard, progress, version=version, block_elems=block_elems,
                         level=level, frame_elems=frame_elems, threads=threads)
        try:
            if items:  # later tensors' first blocks are asked for as the one before ends
                _prefetch_start(items[0], ft, base, sink, _reads_base(sink, settings))
            for pos, item in enumerate(items):
                following = items[pos + 1] if pos + 1 < len(items) else None
                cut = None if cuts is None else cuts.get(item.name)
                _tensor(sink, item, following, ft, base, settings, block_elems, cut)
            return sink.finish()
        finally:
            sink.close()


def _tensor(sink, item, following, ft, base, settings, block_elems, cut=None) -> None:
    rows = TensorRows(ft, item.name, item.rows, item.cols)
    if item.base_name is None:
        sink.stored(item, rows, None)
        return
    brows = base_rows(base, item)
    digest = Digest()  # format 2 records the base rows' digest (docs/format.md 6.7)
    if item.base_rows is None and identical(rows, brows, block_elems=block_elems,
                                            seen=digest.add if sink.version >= 2 else None):
        sink.unchanged(item, digest.value)
        return
    if item.action == "store":
        sink.stored(item, rows, brows)
        return
    whole = item.k >= item.cols and not sink.needs_kernel_for_full_rows and cut is None
    cutter = None if cut is None else Cutter(item, cut, settings)
    with_base = _reads_base(sink, settings)
    ranges = sink.blocks(item)
    for n, (r0, r1) in enumerate(ranges):
        # The disk reads what comes next while this block computes: the next block (and
        # its base rows, when the sink or the rule reads them), or the next tensor's first
        # block and the head of its base.
        if n + 1 < len(ranges):
            s0, s1 = ranges[n + 1]
            rows.prefetch(s0, s1)
            if with_base and s0 < item.with_base:
                brows.prefetch(s0, min(s1, item.with_base))
        elif following is not None:
            _prefetch_start(following, ft, base, sink, with_base)
        if r0 >= item.with_base:  # a resized tensor's new rows: kept whole, no base
            sink.block(item, rows, None, r0, r1, None)
            continue
        if cutter is not None:
            mask = cutter.mask(rows, brows, r0, r1)
        else:
            mask = None if whole else _select(item, rows, brows, r0, r1, settings)
        if mask is not None and brows.stored != brows.dtype:
            _check_cast(item, brows, r0, r1, mask)
        sink.block(item, rows, brows, r0, r1, mask)


def _check_cast(item, brows, r0, r1, mask) -> None:
    """A reset position rebuilds as the base value cast to the fine-tune's dtype; where
    only that cast makes it infinite (a float32 base value beyond float16's range), the
    rebuilt model would hold inf: refused, naming the row, rather than written."""
    bad = dtypes.cast_overflows(brows.raw(r0, r1), brows.stored, brows.dtype)
    bad &= ~mask.reshape(bad.shape)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise cast_overflow_error(item, brows, r0 + i, j, "at a reset position: the rebuilt "
                                                          "model would hold inf there")


def _select(item, rows, base_rows, r0, r1, settings):
    # KEN reads only the fine-tune; the other rules may compare with the base.
    try:
        return kernels.select(
            settings.method, rows.raw(r0, r1), item.k,
            base_rows=None if settings.method == "ken" else base_rows.read(r0, r1),
            ties=settings.ties, seed=settings.seed, salt=tensor_salt(item.name), row_offset=r0)
    except KenstreamError as exc:
        raise selection_error(exc, item, rows, base_rows)


def _reads_base(sink, settings) -> bool:
    """Whether a selected block's base rows are read: format 2 codes every kept value
    against its base; the rules other than KEN compare with the base."""
    return sink.version >= 2 or settings.method != "ken"


def _prefetch_start(item, ft, base, sink, with_base: bool) -> None:
    """Start reading the first block of ``item`` and of its base (or, when the base rows
    are not read, just enough of it for `identical`)."""
    r0, r1 = sink.blocks(item)[0]
    TensorRows(ft, item.name, item.rows, item.cols).prefetch(r0, r1)
    if item.base_name is None:
        return
    head = min(r1, item.with_base) * base_rows(base, item).row_bytes if with_base else 0
    base.prefetch(item.base_name, 0, max(1 << 18, head))
