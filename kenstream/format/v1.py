"""Format 1's encodings of a selected tensor: a bitmask or column indices, and raw values.

No I/O. :func:`tail_entries` chooses a selected tensor's encoding and builds the entries
that follow its values (the writer side); :class:`V1Tensor` checks a tensor's entries
against its record once and then rebuilds or describes any row block (the reader side).
Arrays are in storage dtype (BF16 travels as uint16 bits), so every value is copied bit
for bit. The bit scatter and popcount are numba kernels (:mod:`kenstream.kernels.pack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DiffError
from ..kernels.pack import merge_into, padding_bits_set, row_popcounts
from . import spec
from .layout import count_code, encoded_sizes, index_code, uint_dtype
from .records import TensorRecord


@dataclass(frozen=True)
class Entry:
    """One shard entry: ``role`` is the suffix after ``::``; ``data`` a C-contiguous array."""

    role: str
    dtype: str
    shape: tuple
    data: np.ndarray


def tail_entries(packed: np.ndarray, counts: np.ndarray, cols: int, itemsize: int,
                 block_elems: int = spec.DEFAULT_BLOCK_ELEMS):
    """Choose the encoding of a selected tensor from its packed mask; returns
    ``(encoding, row_kept, entries)`` with the entries that follow ``values``.

    ``packed`` is the uint8 [rows, ceil(cols/8)] bitmask, ``counts`` the kept count of each
    row. Bitmask unless indices are strictly smaller; cost O(rows * cols / 8), plus the
    column list when indices win (then fewer than 1 in 16 positions are kept).
    """
    rows = counts.size
    kept = int(counts.sum())
    counts_vary = bool(rows > 0 and (counts != counts[0]).any())
    row_kept = None if counts_vary or rows == 0 else int(counts[0])
    bitmask, indices = encoded_sizes(rows, cols, kept, itemsize, counts_vary)
    if bitmask <= indices:
        return "bitmask", row_kept, (Entry("mask", "U8", (rows, (cols + 7) // 8), packed),)
    icode = index_code(cols)
    columns = np.empty(kept, dtype=uint_dtype(icode))
    at = 0
    for r0, r1 in spec.row_blocks(rows, cols, block_elems):
        mask = np.unpackbits(packed[r0:r1], axis=1, count=cols, bitorder="little")
        cols_here = np.nonzero(mask)[1]
        columns[at:at + cols_here.size] = cols_here
        at += cols_here.size
    entries = [Entry("index", icode, (kept,), columns)]
    if counts_vary:
        ccode = count_code(cols)
        entries.append(Entry("counts", ccode, (rows,), counts.astype(uint_dtype(ccode))))
    return "indices", row_kept, tuple(entries)


class V1Tensor:
    """The entries of one format-1 tensor, checked, decoded by row range.

    ``entries`` maps role -> array as the shard holds it (dtype and shape already checked
    against the record by the reader). Construction checks the content against the record
    before any array is indexed: entry sizes, the mask's bit count, column numbers in
    range, row counts adding up. Cost O(rows * cols / 8) for a bitmask (one parallel
    popcount), O(kept) for indices; memory one count per row.
    """

    def __init__(self, name: str, rec: TensorRecord, entries: dict):
        self.name, self.rec = name, rec
        rows, cols = rec.rows, rec.cols
        self.values = entries["values"].reshape(-1) if "values" in entries else None
        self.row_start = None  # index in ``values`` of each row's first kept value
        enc = rec.encoding
        # Entries read block by block (for prefetch and release; counts are small).
        self.roles = {"unchanged": (), "dense": ("values",), "bitmask": ("mask", "values"),
                      "indices": ("index", "values")}[enc]
        if enc == "unchanged":
            return
        if self.values is None or self.values.size != rec.kept:
            self._bad(f"values entry has {None if self.values is None else self.values.size} "
                      f"elements, record says {rec.kept}")
        if enc == "dense":
            return
        if enc == "bitmask":
            self.mask = entries["mask"].reshape(rows, -1)
            if padding_bits_set(self.mask, cols):
                self._bad("mask has bits set past the end of a row")
            counts = row_popcounts(self.mask)
            if int(counts.sum()) != rec.kept:
                self._bad("mask bit count does not match the kept count")
        else:
            self.index = entries["index"].reshape(-1)
            if "counts" in entries:
                counts = entries["counts"].astype(np.int64)
                if int(counts.sum()) != rec.kept:
                    self._bad("row counts do not add up to the kept count")
                if counts.size and int(counts.max()) > cols:
                    self._bad("a row count is larger than the row")
            elif rec.row_kept is None or rec.row_kept * rows != rec.kept:
                self._bad("row_kept does not match the kept count")
            else:
                counts = np.full(rows, rec.row_kept, dtype=np.int64)
            if self.index.size and int(self.index.max()) >= cols:
                self._bad("a column index is out of range")
        self.counts = counts
        self.row_start = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(counts, out=self.row_start[1:])

    def _bad(self, message):
        raise DiffError(message, tensor=self.name)

    def value_span(self, r0: int, r1: int) -> tuple[int, int]:
        """Indices in ``values`` of the kept values of rows r0..r1."""
        if self.rec.encoding == "dense":
            return r0 * self.rec.cols, r1 * self.rec.cols
        if self.row_start is None:
            return 0, 0
        return int(self.row_start[r0]), int(self.row_start[r1])

    def build(self, out: np.ndarray, base: np.ndarray | None, r0: int) -> None:
        """Write rebuilt rows ``r0 : r0 + len(out)`` into ``out`` [n, cols] (storage dtype).

        ``base`` holds the same rows of the base, already in ``out``'s dtype (None for a
        dense tensor); ``out`` may be ``base`` itself. One parallel pass for bitmask.
        """
        enc = self.rec.encoding
        n, cols = out.shape
        start, stop = self.value_span(r0, r0 + n)
        if enc == "dense":
            np.copyto(out, self.values[start:stop].reshape(n, cols))
            return
        if enc == "bitmask":
            merge_into(out, base, self.mask[r0:r0 + n], self.values[start:stop],
                       self.counts[r0:r0 + n])
            return
        if out is not base:
            np.copyto(out, base)
        if enc == "indices":
            index = self.index[start:stop].astype(np.int64)
            row_of = np.repeat(np.arange(n, dtype=np.int64), self.counts[r0:r0 + n])
            out.reshape(-1)[row_of * cols + index] = self.values[start:stop]

    def kept_rows(self, r0: int, r1: int) -> np.ndarray:
        """Bool [r1 - r0, cols]: which positions of rows r0..r1 come from the diff.

        The range is clipped to the tensor. Cost O((r1 - r0) * cols).
        """
        rows, cols = self.rec.rows, self.rec.cols
        r0, r1 = max(0, r0), min(rows, r1)
        enc = self.rec.encoding
        if enc == "dense":
            return np.ones((r1 - r0, cols), dtype=bool)
        if enc == "unchanged":
            return np.zeros((r1 - r0, cols), dtype=bool)
        if enc == "bitmask":
            return np.unpackbits(self.mask[r0:r1], axis=1, count=cols,
                                 bitorder="little").view(bool)
        out = np.zeros((r1 - r0, cols), dtype=bool)
        start, stop = self.value_span(r0, r1)
        index = self.index[start:stop].astype(np.int64)
        row_of = np.repeat(np.arange(r1 - r0, dtype=np.int64), self.counts[r0:r1])
        out[row_of, index] = True
        if np.count_nonzero(out) != stop - start:  # a forged index repeats a column
            self._bad("a row lists a column number twice")
        return out

    def kept_values(self, r0: int, r1: int) -> np.ndarray:
        """The stored values of rows r0..r1, row-major (storage dtype)."""
        start, stop = self.value_span(r0, r1)
        return self.values[start:stop] if self.values is not None else self.values

    def byte_span(self, role: str, r0: int, r1: int) -> tuple[int, int]:
        """Bytes of entry ``role`` that rows r0..r1 use (for prefetch and release)."""
        if role == "mask":
            width = (self.rec.cols + 7) // 8
            return r0 * width, r1 * width
        start, stop = self.value_span(r0, r1)
        size = self.rec.itemsize if role == "values" else self.index.itemsize
        return start * size, stop * size
