"""Format 1's shard writer side: raw values, then a bitmask or column indices per tensor.

Kept for diffs that older readers must open (``--format-version 1``). One encoder thread
packs block b while the kernel selects block b+1; only the packed bitmask of the tensor in
hand (1 bit a parameter) is kept until the tensor ends, to choose bitmask or indices.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import dtypes
from ..format import spec
from ..format.records import TensorRecord, digest_text, shard_metadata
from ..format.v1 import tail_entries
from ..kernels.pack import pack_rows, row_counts


def record(item, encoding, reason, shard, kept, row_kept, nbytes, *extra, version=1,
           digest=None):
    """The record of a written tensor; ``k`` only for a selected one; ``digest``: its base
    rows' (format 2)."""
    selected = reason == "selected"
    return TensorRecord(item.base_name, encoding, reason, item.dtype, tuple(item.shape),
                        item.rows, item.cols, item.k if selected else None, kept, row_kept,
                        shard if nbytes or encoding != "unchanged" else None, nbytes, *extra,
                        base_rows=item.base_rows if version >= 2 else None,
                        base_digest=None if digest is None else digest_text(digest),
                        version=version)


class V1Sink:
    """Receives the compress loop's tensors and blocks and writes them in format 1."""

    version = 1
    needs_kernel_for_full_rows = True  # format 1 records a mask even when rows are kept whole

    def __init__(self, writer, shard: str, progress, block_elems: int):
        self.writer, self.shard, self.progress = writer, shard, progress
        self.block_elems = block_elems
        self.records = {}
        self._state = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kenstream-pack")
        self._pending = None

    def blocks(self, item) -> list:
        return list(spec.row_blocks(item.rows, item.cols, self.block_elems))

    def _hand_over(self, fn, *args):
        # Waiting for the previous task first keeps at most two blocks' masks alive.
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(fn, *args)

    def unchanged(self, item, digest=None) -> None:
        """Format 1 records no digest."""
        self._hand_over(self._unchanged, item)

    def _unchanged(self, item):
        self.records[item.name] = record(item, "unchanged", "identical", self.shard, 0, None, 0)
        self.progress.update(item.params)

    def stored(self, item, rows, base_rows) -> None:
        self._hand_over(self._dense, item, rows)

    def _dense(self, item, rows):  # encoder thread: the whole tensor, block by block
        writer = self.writer
        begin = writer.data_bytes
        writer.begin(spec.entry_name(item.name, "values"), item.dtype)
        for r0, r1 in self.blocks(item):
            writer.write(rows.raw(r0, r1))
            rows.release(r0, r1)
        writer.end(item.shape)
        self.records[item.name] = record(item, "dense", item.reason, self.shard, item.params,
                                         None, writer.data_bytes - begin)
        self.progress.update(item.params)

    def block(self, item, rows, base_rows, r0, r1, mask) -> None:
        base_rows.release(r0, r1)  # read by the selection rule only
        self._hand_over(self._block, item, rows, r0, r1, mask)

    def _block(self, item, rows, r0, r1, mask):  # encoder thread: pack one selected block
        writer, state = self.writer, self._state
        if r0 == 0:
            state.update(begin=writer.data_bytes,
                         packed=np.zeros((item.rows, (item.cols + 7) // 8), dtype=np.uint8),
                         counts=np.zeros(item.rows, dtype=np.int64))
            writer.begin(spec.entry_name(item.name, "values"), item.dtype)
        counts = row_counts(mask)
        packed, values = pack_rows(mask, rows.raw(r0, r1), counts)
        state["packed"][r0:r1] = packed
        state["counts"][r0:r1] = counts
        writer.write(values)
        rows.release(r0, r1)
        self.progress.update((r1 - r0) * item.cols)
        if r1 == item.rows:
            kept = int(state["counts"].sum())
            writer.end((kept,))
            encoding, row_kept, tail = tail_entries(state["packed"], state["counts"],
                                                    item.cols, dtypes.itemsize(item.dtype),
                                                    self.block_elems)
            for e in tail:
                writer.append(spec.entry_name(item.name, e.role), e.dtype, e.shape, e.data)
            self.records[item.name] = record(item, encoding, "selected", self.shard, kept,
                                             row_kept, writer.data_bytes - state["begin"])
            state.clear()

    def finish(self) -> dict:
        """Wait for the last task, write the header; returns name -> TensorRecord."""
        if self._pending is not None:
            self._pending.result()
        self.writer.finish(shard_metadata(self.records, 1))
        return self.records

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
