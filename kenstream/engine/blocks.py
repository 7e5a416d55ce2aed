"""The diff side of the streaming block layer: one tensor of base + diff, block by block.

Rebuild, verify, viz and ``load`` all open a diff tensor through :class:`TensorBlocks`,
so all of them run the same checks (the reader's dtype and shape checks, then the
encoding's content checks) before any array is indexed, and all walk the same row blocks.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from ..errors import DiffError, KenstreamError
from ..format import spec
from ..format.v1 import V1Tensor
from ..io.rows import TensorRows


class TensorBlocks:
    """Tensor ``name`` of ``diff`` (a DiffReader) over ``base`` (a Checkpoint, or None when
    only the kept positions are wanted), in row blocks of about ``block_elems`` values.

    `build` writes block ``i`` of the rebuilt tensor (the base rows in the fine-tune's
    dtype, kept values written over them) into a caller's array; `kept` gives the block's
    kept mask; `prefetch` asks the disk for a block before it is needed. Pages are
    released as blocks are built.
    """

    def __init__(self, name: str, diff, base=None, block_elems: int = spec.DEFAULT_BLOCK_ELEMS):
        self.name, self.diff = name, diff
        rec = self.rec = diff.records[name]
        entries = diff.entries(name)
        try:
            self.codec = V1Tensor(name, rec, entries)
        except KenstreamError as exc:
            raise exc.located(file=diff.path)
        if "mask" in entries:
            # The check read the whole mask (1 bit a parameter, 16 MB for a 7B embedding);
            # let it go until each block needs its rows, so memory stays flat in model size.
            diff.release(name, "mask")
        self.rows, self.cols = rec.rows, rec.cols
        self.dtype = dtypes.storage_dtype(rec.dtype)
        self.ranges = list(spec.row_blocks(self.rows, self.cols, block_elems))
        self.base = None
        if base is not None and rec.encoding != "dense":
            binfo = base.info(rec.base_name)
            if tuple(binfo.shape) != tuple(rec.shape):
                raise DiffError(f"base tensor {rec.base_name!r} has shape {list(binfo.shape)}, "
                                f"diff expects {list(rec.shape)}", file=diff.path, tensor=name)
            self.base = TensorRows(base, rec.base_name, self.rows, self.cols, rec.dtype)

    def shape(self, i: int) -> tuple:
        r0, r1 = self.ranges[i]
        return (r1 - r0, self.cols)

    def prefetch(self, i: int) -> None:
        """Ask for block ``i``'s base rows and diff entries."""
        r0, r1 = self.ranges[i]
        if self.base is not None:
            self.base.prefetch(r0, r1)
        for role in self.codec.roles:
            self.diff.prefetch(self.name, role, *self.codec.byte_span(role, r0, r1))

    def base_rows(self, i: int) -> np.ndarray | None:
        """Block ``i`` of the base in the fine-tune's dtype (None for a dense tensor)."""
        if self.rec.encoding == "dense":
            return None
        if self.base is None:
            raise DiffError("needs the base to be rebuilt", tensor=self.name)
        return self.base.read(*self.ranges[i])

    def build(self, i: int, out: np.ndarray, base_rows: np.ndarray | None = None) -> None:
        """Write block ``i`` of the rebuilt tensor into ``out`` ([n, cols], storage dtype);
        ``base_rows`` saves reading the base again when the caller has the block."""
        r0, r1 = self.ranges[i]
        if base_rows is None:
            base_rows = self.base_rows(i)
        self.codec.build(out, base_rows, r0)
        if self.base is not None:
            self.base.release(r0, r1)
        for role in self.codec.roles:
            self.diff.release(self.name, role, *self.codec.byte_span(role, r0, r1))

    def kept(self, i: int) -> np.ndarray:
        """Bool [n, cols]: the positions of block ``i`` that come from the diff."""
        return self.codec.kept_rows(*self.ranges[i])

    def kept_rows(self, r0: int, r1: int) -> np.ndarray:
        """Bool [r1 - r0, cols] for any row range (clipped to the tensor)."""
        return self.codec.kept_rows(r0, r1)

    def kept_values(self, r0: int, r1: int) -> np.ndarray:
        """The stored values of rows r0..r1, row-major, in the storage dtype."""
        return self.codec.kept_values(r0, r1)

    def release(self) -> None:
        """Drop every page of this tensor's diff entries and base tensor."""
        self.diff.release(self.name)
        if self.base is not None:
            self.base.release()

    def rebuilt(self) -> np.ndarray:
        """The whole rebuilt tensor as a new array (storage dtype, the record's shape)."""
        out = np.empty((self.rows, self.cols), dtype=self.dtype)
        for i, (r0, r1) in enumerate(self.ranges):
            if i + 1 < len(self.ranges):
                self.prefetch(i + 1)
            self.build(i, out[r0:r1])
        return out.reshape(self.rec.shape)


def check_shapes(d, b) -> None:
    """Every record that takes values from the base names a base tensor of its shape.

    Run before anything is allocated: sizes then come from bytes that exist (the base's
    tensors), never from a record alone (a forged shape ``[1, 2**58]``). Cost O(tensors),
    headers only."""
    for name, rec in d.records.items():
        if rec.encoding == "dense":
            continue
        try:
            binfo = b.info(rec.base_name)
        except KenstreamError:
            raise DiffError(f"its base tensor {rec.base_name!r} is not in the base",
                            file=d.path, tensor=name) from None
        if tuple(binfo.shape) != tuple(rec.shape):
            raise DiffError(f"base tensor {rec.base_name!r} has shape {list(binfo.shape)}, "
                            f"diff expects {list(rec.shape)}", file=d.path, tensor=name)
