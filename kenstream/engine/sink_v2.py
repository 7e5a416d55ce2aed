"""Format 2's shard writer side: every stored tensor as independently coded frames.

Frames are coded on a pool of threads (zstd and the numba codec release the GIL); their
bytes are appended to the shard in order as they finish, and a tensor's frame table
follows its last frame. Tensors stored whole stream through the pool continuously, from
one tensor into the next: the writer's steps between two tensors (the table and record
of one, the start of the next) wait in the same ordered queue as the frames, so the loop
goes on to read and submit the next tensor while the last frames of one are coded. A
selected block's frames are coded between two runs of the selection kernel, which uses
every core itself. At most a few frames per thread are in flight, so memory stays a few
blocks whatever the model's size.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..format import spec
from ..format.records import shard_metadata
from ..format.v2 import Frame, encode_frame
from ..kernels.digest import add as add_digest
from ..kernels.digest import rows_digest
from .sink_v1 import record


def _done(value):
    """A finished future holding ``value``."""
    future = Future()
    future.set_result(value)
    return future


class _Tensor:
    """What is known of a tensor being written: its frames' table rows and row counts."""

    def __init__(self, item):
        self.item = item
        self.digest = 0  # of the base rows coded so far (kernels.digest)
        self.begin = None  # the shard's data offset of its first frame, once written
        self.table = []
        self.low, self.high = None, None  # smallest and largest kept count of a row

    def add(self, r0, frame, digest: int) -> None:
        self.table.append((r0, frame.positions, frame.values, frame.kept))
        self.digest = add_digest(self.digest, digest)
        if frame.counts.size:
            lo, hi = int(frame.counts.min()), int(frame.counts.max())
            self.low = lo if self.low is None else min(self.low, lo)
            self.high = hi if self.high is None else max(self.high, hi)


class V2Sink:
    """Receives the compress loop's tensors and blocks and writes them in format 2."""

    version = 2
    needs_kernel_for_full_rows = False

    def __init__(self, writer, shard: str, progress, block_elems: int, *, level: int,
                 frame_elems: int, threads: int):
        self.writer, self.shard, self.progress = writer, shard, progress
        self.block_elems, self.level, self.frame_elems = block_elems, level, frame_elems
        self.records = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                        thread_name_prefix="kenstream-code")
        # In shard order: (tensor, first row, future) for a frame, (step, argument) for what
        # the writer does between frames (`_begin`, `_close`).
        self._queue = deque()
        self._frames = 0  # frames in the queue
        self._limit = 2 * max(1, threads) + 2
        self._open = None

    def blocks(self, item) -> list:
        """Selection blocks: runs of whole frames of about ``block_elems`` values, none
        across the first row without a base."""
        frames = spec.frame_ranges(item.rows, item.cols, self.frame_elems, item.base_rows)
        per = max(1, self.block_elems // max(1, (frames[0][1] - frames[0][0]) * item.cols))
        out, run = [], []
        for r0, r1 in frames:
            if run and (len(run) == per or r0 == item.base_rows):
                out.append((run[0][0], run[-1][1]))
                run = []
            run.append((r0, r1))
        out.append((run[0][0], run[-1][1]))
        return out

    def unchanged(self, item, digest: int) -> None:
        """``digest``: of its base rows, read by the comparison that found it unchanged."""
        # Written at once, ahead of frames still queued: nothing of it goes in the file's
        # data, and the shard's records are written sorted by name.
        self.records[item.name] = record(item, "unchanged", "identical", self.shard, 0, None,
                                         0, 0, 0, 0, version=2, digest=digest)
        self.progress.update(item.params)

    def stored(self, item, rows, base_rows) -> None:
        """The whole tensor, every position kept, coded against the base where there is one."""
        for r0, r1 in self.blocks(item):
            self.block(item, rows, base_rows if r0 < item.with_base else None, r0, r1, None)

    def block(self, item, rows, base_rows, r0, r1, mask) -> None:
        """Code rows r0..r1 (``mask``: their kept positions, None for all) as frames."""
        if self._open is None or self._open.item is not item:
            self._open = _Tensor(item)
            self._queue.append((self._begin, self._open))
        tensor = self._open
        if item.params == 0:  # no values: one empty frame, whatever the rows (2**58 x 0)
            self._frame(tensor, 0, _done((Frame(b"", 0, 0, 0, np.zeros(0, np.int64)), 0)))
            self._end(tensor)
            return
        step = max(1, self.frame_elems // max(item.cols, 1))
        for f0 in range(r0, max(r1, r0 + 1), step):
            f1 = min(r1, f0 + step)
            sub = None if mask is None else mask[f0 - r0:f1 - r0]
            self._frame(tensor, f0, self._pool.submit(self._code, item, rows, base_rows, f0,
                                                      f1, sub))
        if mask is not None:
            # The selection kernel runs on every core: coding beside it gained nothing
            # (docs/benchmarks.md). Code this block's frames on every core now, and select
            # the next one after.
            self._drain(0)
        if r1 >= item.rows:
            self._end(tensor)

    def _frame(self, tensor, r0, future) -> None:
        self._queue.append((tensor, r0, future))
        self._frames += 1
        self._drain(self._limit)

    def _end(self, tensor) -> None:
        """The tensor's last frame is queued: its table follows it."""
        self._queue.append((self._close, tensor))
        self._open = None
        self._drain(self._limit)

    def _begin(self, tensor) -> None:
        tensor.begin = self.writer.data_bytes
        self.writer.begin(spec.entry_name(tensor.item.name, "frames"), "U8")

    def _code(self, item, rows, base_rows, r0, r1, mask):  # a pool thread
        """(the frame of rows r0..r1, the digest of their base rows)."""
        ft = rows.raw(r0, r1)
        base = None if base_rows is None else base_rows.read(r0, r1)
        frame = encode_frame(ft, base, mask, item.dtype, self.level)
        digest = 0 if base is None else rows_digest(base, r0)
        rows.release(r0, r1)
        if base_rows is not None:
            base_rows.release(r0, r1)
        return frame, digest

    def _drain(self, keep: int) -> None:
        """Write finished frames, in order, until at most ``keep`` are in flight, and the
        writer's steps queued before the next of them."""
        while self._queue and (self._frames > keep or len(self._queue[0]) == 2):
            entry = self._queue.popleft()
            if len(entry) == 2:
                step, argument = entry
                step(argument)
                continue
            tensor, r0, future = entry
            self._frames -= 1
            frame, digest = future.result()
            self.writer.write(np.frombuffer(frame.data, np.uint8))
            tensor.add(r0, frame, digest)
            rows = frame.counts.size
            self.progress.update(rows * tensor.item.cols)

    def _close(self, tensor) -> None:
        item, writer = tensor.item, self.writer
        pos = sum(t[1] for t in tensor.table)
        val = sum(t[2] for t in tensor.table)
        writer.end((pos + val,))
        table = np.array(tensor.table, dtype="<u8").reshape(-1, spec.TABLE_ROW_BYTES // 8)
        writer.append(spec.entry_name(item.name, "table"), "U64", table.shape, table)
        kept = int(sum(t[3] for t in tensor.table))
        row_kept = tensor.low if tensor.low == tensor.high else None
        self.records[item.name] = record(item, "coded", item.reason, self.shard, kept,
                                         row_kept, writer.data_bytes - tensor.begin,
                                         len(tensor.table), pos, val, version=2,
                                         digest=None if item.base_name is None
                                         else tensor.digest)

    def finish(self) -> dict:
        """Write what is queued and the header; returns name -> TensorRecord."""
        self._drain(0)
        self.writer.finish(shard_metadata(self.records, 2))
        return self.records

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
