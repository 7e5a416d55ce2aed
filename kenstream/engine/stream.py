"""The compress loop of one diff shard, streaming in row blocks.

Part of the engine (it joins the readers, the kernels and the writer). Every tensor goes
through in row blocks of about ``block_elems`` parameters: the main thread selects block
b+1 with the parallel kernel while an encoder thread packs block b, appends its kept
values to the shard and releases its input pages. Resident memory is therefore a few
blocks, whatever the size of the largest tensor or of the model; only the packed bitmask
of the tensor in hand (1 bit a parameter) is kept until the tensor ends, to choose
between bitmask and indices.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import dtypes, kernels
from ..errors import KenstreamError
from ..format import spec
from ..format.layout import header_reserve
from ..format.records import TensorRecord, shard_metadata
from ..format.v1 import tail_entries
from ..io.rows import TensorRows, identical
from ..kernels.pack import pack_rows


def _record(item, encoding, reason, shard, kept, row_kept, nbytes) -> TensorRecord:
    selected = encoding in spec.SELECTED_ENCODINGS
    return TensorRecord(item.base_name, encoding, reason, item.dtype, tuple(item.shape),
                        item.rows, item.cols, item.k if selected else None, kept, row_kept,
                        shard if nbytes or encoding != "unchanged" else None, nbytes)


def _salt(name: str) -> int:
    """Per-tensor salt of the random rule: tensors of one shape get different masks."""
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


def write_shard(shards, shard: str, items, ft, base, settings, progress,
                block_elems: int = spec.DEFAULT_BLOCK_ELEMS) -> dict:
    """Write diff shard ``shard`` of ``shards`` (a ShardSet) for plan ``items``; returns
    their records (name -> TensorRecord)."""
    records = {}
    writer = shards.open(shard, header_reserve(items, shard, settings.ties))
    state = {}

    def blocks(item):
        return list(spec.row_blocks(item.rows, item.cols, block_elems))

    def dense(item, rows, reason):  # encoder thread: the whole tensor, block by block
        begin = writer.data_bytes
        writer.begin(spec.entry_name(item.name, "values"), item.dtype)
        for r0, r1 in blocks(item):
            writer.write(rows.raw(r0, r1))
            rows.release(r0, r1)
        writer.end(item.shape)
        records[item.name] = _record(item, "dense", reason, shard, item.params, None,
                                     writer.data_bytes - begin)
        progress.update(item.params)

    def unchanged(item):
        records[item.name] = _record(item, "unchanged", "identical", shard, 0, None, 0)
        progress.update(item.params)

    def block(item, rows, r0, r1, mask):  # encoder thread: pack one selected block
        if r0 == 0:
            state.update(begin=writer.data_bytes,
                         packed=np.zeros((item.rows, (item.cols + 7) // 8), dtype=np.uint8),
                         counts=np.zeros(item.rows, dtype=np.int64))
            writer.begin(spec.entry_name(item.name, "values"), item.dtype)
        counts = np.count_nonzero(mask, axis=1)
        packed, values = pack_rows(mask, rows.raw(r0, r1), counts)
        state["packed"][r0:r1] = packed
        state["counts"][r0:r1] = counts
        writer.write(values)
        rows.release(r0, r1)
        progress.update((r1 - r0) * item.cols)
        if r1 == item.rows:
            kept = int(state["counts"].sum())
            writer.end((kept,))
            encoding, row_kept, tail = tail_entries(state["packed"], state["counts"],
                                                    item.cols, dtypes.itemsize(item.dtype),
                                                    block_elems)
            for e in tail:
                writer.append(spec.entry_name(item.name, e.role), e.dtype, e.shape, e.data)
            records[item.name] = _record(item, encoding, "selected", shard, kept, row_kept,
                                         writer.data_bytes - state["begin"])
            state.clear()

    # One encoder thread packs and writes block b while the kernel selects block b+1;
    # waiting for it before handing over the next keeps at most two blocks' masks alive.
    with writer, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None

        def hand_over(fn, *args):
            nonlocal pending
            if pending is not None:
                pending.result()
            pending = encoder.submit(fn, *args)

        for pos, item in enumerate(items):
            rows = TensorRows(ft, item.name, item.rows, item.cols)
            following = items[pos + 1] if pos + 1 < len(items) else None
            if item.base_name is None:
                hand_over(dense, item, rows, item.reason)
                continue
            base_rows = TensorRows(base, item.base_name, item.rows, item.cols, item.dtype)
            if identical(rows, base_rows, block_elems=block_elems):
                hand_over(unchanged, item)
                continue
            if item.action == "store":
                hand_over(dense, item, rows, item.reason)
                continue
            ranges = blocks(item)
            for n, (r0, r1) in enumerate(ranges):
                # The disk reads what comes next while this block computes: the next block,
                # or the next tensor's first block and the head of its base.
                if n + 1 < len(ranges):
                    rows.prefetch(*ranges[n + 1])
                elif following is not None:
                    _prefetch_start(following, ft, base, block_elems)
                # KEN reads only the fine-tune; the other rules may compare with the base.
                try:
                    mask = kernels.select(
                        settings.method, rows.raw(r0, r1), item.k,
                        base_rows=None if settings.method == "ken" else base_rows.read(r0, r1),
                        ties=settings.ties, seed=settings.seed, salt=_salt(item.name),
                        row_offset=r0)
                except KenstreamError as exc:
                    raise exc.located(file=rows.info.file, tensor=item.name)
                base_rows.release(r0, r1)
                hand_over(block, item, rows, r0, r1, mask)
        if pending is not None:
            pending.result()
        writer.finish(shard_metadata(records))
    return records


def _prefetch_start(item, ft, base, block_elems) -> None:
    """Start reading the first block of ``item`` and enough of its base for `identical`."""
    r0, r1 = next(spec.row_blocks(item.rows, item.cols, block_elems))
    TensorRows(ft, item.name, item.rows, item.cols).prefetch(r0, r1)
    if item.base_name is not None:
        base.prefetch(item.base_name, 0, 1 << 18)
