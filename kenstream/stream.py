"""The compress loop of one diff shard, streaming in row blocks.

Part of the engine (it joins the readers, the kernels and the writer). Every tensor goes
through in blocks of about `format.BLOCK_ELEMS` parameters: the main thread selects block b+1 with
the parallel kernel while an encoder thread packs block b, appends its kept values to the
shard and releases its input pages. Resident memory is therefore a few blocks, whatever the
size of the largest tensor or of the model; only the packed bitmask of the tensor in hand
(1 bit a parameter) is kept until the tensor ends, to choose between bitmask and indices.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import dtypes, format as fmt
from .format import row_blocks
from ._pack import pack_rows
from .errors import KenstreamError
from .io.writer import ShardWriter
from .plan import header_reserve, shard_metadata

def _select(item, ft_rows, base_rows, settings, row_offset):
    """Bool mask of kept positions for rows ``row_offset ...`` of one tensor."""
    if settings.method == "ken":
        from .select import select_mask

        return select_mask(ft_rows, item.k, ties=settings.ties)
    from .methods import select_mask_method

    salt = zlib.crc32(item.name.encode("utf-8"))
    return select_mask_method(settings.method, ft_rows, base_rows, item.k, seed=settings.seed,
                              salt=salt, row_offset=row_offset)


class _Tensor:
    """One tensor's inputs as [rows, cols] views, with the base in the fine-tune's dtype."""

    def __init__(self, item, ft, base):
        self.item, self.ft, self.base = item, ft, base
        self.ft2d = ft.array(item.name).reshape(item.rows, item.cols)
        self.row_bytes = item.cols * dtypes.itemsize(item.dtype)
        self.base2d = None
        if item.base_name is not None:
            self.base_code = base.info(item.base_name).dtype
            self.base2d = base.array(item.base_name).reshape(item.rows, item.cols)
            self.base_row_bytes = item.cols * dtypes.itemsize(self.base_code)

    def base_rows(self, r0, r1):
        rows = self.base2d[r0:r1]
        if self.base_code != self.item.dtype:
            rows = dtypes.convert(rows, self.base_code, self.item.dtype)
        return rows

    def identical(self) -> bool:
        """Bitwise equality with the base, in growing blocks: a changed tensor almost
        always differs in its first rows, so only a few base pages are read."""
        rows = self.item.rows
        r0, step = 0, max(1, (1 << 16) // max(self.row_bytes, 1))
        while r0 < rows:
            r1 = min(rows, r0 + step)
            a = np.ascontiguousarray(self.ft2d[r0:r1]).view(np.uint8)
            b = np.ascontiguousarray(self.base_rows(r0, r1)).view(np.uint8)
            same = np.array_equal(a, b)
            self.release_ft(r0, r1)
            self.release_base(r0, r1)
            if not same:
                return False
            r0, step = r1, min(step * 4, max(1, fmt.BLOCK_ELEMS // max(self.item.cols, 1)))
        return True

    def release_ft(self, r0, r1):
        self.ft.release(self.item.name, r0 * self.row_bytes, r1 * self.row_bytes)

    def release_base(self, r0, r1):
        if self.base2d is not None:
            self.base.release(self.item.base_name, r0 * self.base_row_bytes,
                              r1 * self.base_row_bytes)

    def prefetch(self, r0, r1):
        self.ft.prefetch(self.item.name, r0 * self.row_bytes, r1 * self.row_bytes)


def _prefetch_start(item, ft, base) -> None:
    """Start reading the first block of ``item`` and enough of its base for `identical`."""
    r0, r1 = next(row_blocks(item.rows, item.cols))
    row_bytes = item.cols * dtypes.itemsize(item.dtype)
    ft.prefetch(item.name, r0 * row_bytes, r1 * row_bytes)
    if item.base_name is not None:
        base.prefetch(item.base_name, 0, 1 << 18)


def _record(item, encoding, reason, shard, kept, row_kept, nbytes) -> dict:
    selected = encoding in ("bitmask", "indices")
    return {"base_name": item.base_name, "encoding": encoding, "reason": reason,
            "dtype": item.dtype, "shape": list(item.shape), "rows": item.rows, "cols": item.cols,
            "k": item.k if selected else None, "kept": kept, "row_kept": row_kept,
            "shard": shard if nbytes or encoding != "unchanged" else None, "nbytes": nbytes}


def write_shard(path, items, ft, base, settings, progress) -> dict:
    """Write one diff shard for plan ``items``; returns their records (docs/format.md 3.2)."""
    records = {}
    writer = ShardWriter(path, header_reserve(items, path.name, settings.ties))
    state = {}

    def dense(t, reason):  # encoder thread: the whole tensor, block by block
        item = t.item
        begin = writer.data_bytes
        writer.begin(f"{item.name}::values", item.dtype)
        for r0, r1 in row_blocks(item.rows, item.cols):
            writer.write(t.ft2d[r0:r1])
            t.release_ft(r0, r1)
        writer.end(item.shape)
        records[item.name] = _record(item, "dense", reason, path.name, item.rows * item.cols,
                                     None, writer.data_bytes - begin)
        progress.update(item.rows * item.cols)

    def unchanged(t):
        records[t.item.name] = _record(t.item, "unchanged", "identical", path.name, 0, None, 0)
        progress.update(t.item.rows * t.item.cols)

    def block(t, r0, r1, mask):  # encoder thread: pack one selected block
        item = t.item
        if r0 == 0:
            state.update(begin=writer.data_bytes,
                         packed=np.zeros((item.rows, (item.cols + 7) // 8), dtype=np.uint8),
                         counts=np.zeros(item.rows, dtype=np.int64))
            writer.begin(f"{item.name}::values", item.dtype)
        counts = np.count_nonzero(mask, axis=1)
        packed, values = pack_rows(mask, t.ft2d[r0:r1], counts)
        state["packed"][r0:r1] = packed
        state["counts"][r0:r1] = counts
        writer.write(values)
        t.release_ft(r0, r1)
        progress.update((r1 - r0) * item.cols)
        if r1 == item.rows:
            kept = int(state["counts"].sum())
            writer.end((kept,))
            encoding, row_kept, tail = fmt.tail_entries(
                state["packed"], state["counts"], item.cols, dtypes.itemsize(item.dtype))
            for e in tail:
                writer.append(f"{item.name}::{e.role}", e.dtype, e.shape, e.data)
            records[item.name] = _record(item, encoding, "selected", path.name, kept, row_kept,
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
            t = _Tensor(item, ft, base)
            following = items[pos + 1] if pos + 1 < len(items) else None
            if item.base_name is None:
                hand_over(dense, t, item.reason)
                continue
            if t.identical():
                hand_over(unchanged, t)
                continue
            if item.action == "store":
                hand_over(dense, t, item.reason)
                continue
            blocks = list(row_blocks(item.rows, item.cols))
            for n, (r0, r1) in enumerate(blocks):
                # The disk reads what comes next while this block computes: the next block,
                # or the next tensor's first block and the head of its base.
                if n + 1 < len(blocks):
                    t.prefetch(*blocks[n + 1])
                elif following is not None:
                    _prefetch_start(following, ft, base)
                # KEN reads only the fine-tune; the other rules may compare with the base.
                base_rows = None if settings.method == "ken" else t.base_rows(r0, r1)
                try:
                    mask = _select(item, t.ft2d[r0:r1], base_rows, settings, r0)
                except KenstreamError as exc:
                    if exc.row is not None and settings.method == "ken":
                        exc.row += r0  # the kernel counts rows within the block
                    raise exc.located(file=ft.info(item.name).file, tensor=item.name)
                t.release_base(r0, r1)
                hand_over(block, t, r0, r1, mask)
        if pending is not None:
            pending.result()
        writer.finish(shard_metadata(records))
    return records
