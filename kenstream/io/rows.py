"""The one reader interface of the streaming engine: a checkpoint tensor as row blocks.

Compress, rebuild, verify and viz all read input tensors through :class:`TensorRows`:
the tensor viewed as ``[rows, cols]``, read a block of rows at a time in a chosen dtype
(the base converted to the fine-tune's dtype, where they differ, is written here once),
with the pages of finished blocks released and the next block's asked for ahead.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes


class TensorRows:
    """Tensor ``name`` of checkpoint ``ckpt`` as ``[rows, cols]``, read in row blocks.

    ``as_dtype`` (a dtype code) converts every block read (rounding as ``torch.Tensor.to``
    does); None keeps the stored dtype. Views of the memory map: nothing is read until a
    block is used, and `read` copies only when it converts.
    """

    def __init__(self, ckpt, name: str, rows: int, cols: int, as_dtype: str | None = None):
        self.ckpt, self.name = ckpt, name
        info = ckpt.info(name)
        self.info = info
        self.rows, self.cols = rows, cols
        self.stored = info.dtype
        self.dtype = as_dtype or info.dtype
        self.row_bytes = cols * dtypes.itemsize(info.dtype)
        self._array = None

    def _view(self) -> np.ndarray:
        if self._array is None:
            self._array = self.ckpt.array(self.name).reshape(self.rows, self.cols)
        return self._array

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 as [r1 - r0, cols] in ``dtype``'s storage (a view if unconverted)."""
        block = self.raw(r0, r1)
        if self.stored != self.dtype:
            block = dtypes.convert(block, self.stored, self.dtype)
        return block

    def read_into(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Rows r0..r1 in ``dtype``'s storage written into ``out`` ([r1 - r0, cols],
        C-contiguous), which is returned. Unconverted rows are read straight into it (one
        copy, no page mapped; nothing to `release` afterwards)."""
        if self.stored != self.dtype:
            np.copyto(out, self.read(r0, r1))
        else:
            self.ckpt.read_into(self.name, r0 * self.row_bytes, out)
        return out

    def raw(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 in the stored dtype (always a read-only view): of the range
        `prefetch` staged past the page cache when one holds them, else of the memory map.

        The file is first checked to be as long as when it was opened: a file cut short by
        another program is one error naming it, not a bus error when the view is read."""
        self.ckpt.check_intact(self.name)
        r1 = min(r1, self.rows)
        staged = self.ckpt.staged(self.name, r0 * self.row_bytes, r1 * self.row_bytes)
        if staged is not None:
            return staged.view(dtypes.storage_dtype(self.stored)).reshape(r1 - r0, self.cols)
        return self._view()[r0:r1]

    def release(self, r0: int = 0, r1: int | None = None) -> None:
        """Drop the pages of rows r0..r1 (all rows by default) from resident memory."""
        stop = None if r1 is None else r1 * self.row_bytes
        self.ckpt.release(self.name, r0 * self.row_bytes, stop)

    def prefetch(self, r0: int, r1: int) -> None:
        """Ask the disk for rows r0..r1 ahead of use."""
        self.ckpt.prefetch(self.name, r0 * self.row_bytes, r1 * self.row_bytes)


def identical(a: TensorRows, b: TensorRows, first_block: int = 1 << 16,
              block_elems: int = 1 << 23, seen=None) -> bool:
    """Whether ``a`` and ``b`` (b read as a's dtype) hold the same bits, compared in
    growing blocks: a changed tensor almost always differs in its first rows, so only a
    few pages are read. Pages are released as they are compared. Tensors without bytes
    are identical at once (their rows, however many, hold nothing). ``seen(block, r0)``,
    when given, is called with each block of ``b`` found equal (a digest's `add`)."""
    if a.rows * a.cols == 0:
        return True
    r0, step = 0, max(1, first_block // max(a.row_bytes, 1))
    while r0 < a.rows:
        r1 = min(a.rows, r0 + step)
        x = np.ascontiguousarray(a.read(r0, r1)).view(np.uint8)
        y = np.ascontiguousarray(b.read(r0, r1)).view(np.uint8)
        same = np.array_equal(x, y)
        if same and seen is not None:
            seen(y.reshape(r1 - r0, -1), r0)
        a.release(r0, r1)
        b.release(r0, r1)
        if not same:
            return False
        r0, step = r1, min(step * 4, max(1, block_elems // max(a.cols, 1)))
    return True
