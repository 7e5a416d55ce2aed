"""Format 2's reader side of one tensor: its frame table checked, its frames decoded.

No I/O: :class:`V2Tensor` gets the ``frames`` and ``table`` entries as arrays (the reader
has checked their dtypes and shapes) and the index's coding. Construction checks the table
against the record and against the frames the format prescribes (so no frame can claim
more rows than a frame holds, and no decode allocates more than one frame); each frame is
then checked as it is decoded (:class:`.v2.FrameDecoder`).
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from ..errors import DiffError
from ..kernels.pack import kept_index, put_at, take_at
from . import spec
from .v2 import FrameDecoder

MAX_ROW_VALUES = 1 << 28
"""A frame holds whole rows; a row of more values than this is refused, so no record can
make a reader allocate more than ~2 GB for one frame (real rows are far shorter)."""


def check_frame_size(name: str, rec, frame_elems: int) -> None:
    """Refuse a record whose largest frame would hold more than ``MAX_ROW_VALUES`` values
    (beyond ``frame_elems``): a forged shape, never a real row. O(1)."""
    if rec.version < 2 or rec.encoding == "unchanged":
        return
    rows = max(1, min(rec.rows, max(1, frame_elems // max(rec.cols, 1))))
    largest = rows * rec.cols
    if largest > max(frame_elems, MAX_ROW_VALUES):
        raise DiffError(f"a frame of {largest} values is larger than any real tensor's row "
                        "(record forged?)", tensor=name)


class V2Tensor:
    """The frames of one format-2 tensor: ranges, kept masks and rebuilt rows per frame.

    Cost of construction O(frames); of a frame O(its rows * cols). The last decoded
    frame's positions and values are kept, so walking a tensor in row ranges that do not
    follow the frames (viz) decodes each frame about once.
    """

    def __init__(self, name: str, rec, entries: dict, frame_elems: int):
        self.name, self.rec = name, rec
        self.roles = () if rec.encoding == "unchanged" else ("frames",)
        self.ranges = spec.frame_ranges(rec.rows, rec.cols, frame_elems, rec.base_rows)
        self._cache = {}
        if rec.encoding == "unchanged":
            self.table = np.zeros((0, 4), np.int64)
            return
        check_frame_size(name, rec, frame_elems)
        self.data = entries["frames"].reshape(-1)
        table = entries["table"].reshape(-1, 4)
        if table.shape[0] != len(self.ranges):
            self._bad(f"has {table.shape[0]} frames, {len(self.ranges)} expected")
        if (table > np.uint64(spec.MAX_COUNT)).any():
            self._bad("frame table holds impossible numbers")
        table = table.astype(np.int64)
        starts = [r0 for r0, _ in self.ranges]
        if table[:, 0].tolist() != starts:
            self._bad("frame table rows do not start where the frames do")
        sizes = np.array([(r1 - r0) * rec.cols for r0, r1 in self.ranges], np.int64)
        if (table[:, 3] > sizes).any() or int(table[:, 3].sum()) != rec.kept:
            self._bad("frame kept counts do not add up to the kept count")
        if int(table[:, 1].sum()) != rec.positions_bytes or \
                int(table[:, 2].sum()) != rec.values_bytes:
            self._bad("frame lengths do not add up to the record's")
        without = np.array([r0 >= rec.with_base for r0, _ in self.ranges])
        if (table[without, 3] != sizes[without]).any():
            self._bad("rows without a base must keep every position")
        self.table = table
        self.offsets = np.concatenate(([0], np.cumsum(table[:, 1] + table[:, 2])))

    def _bad(self, message):
        raise DiffError(message, tensor=self.name)

    def byte_span(self, role: str, r0: int, r1: int) -> tuple[int, int]:
        """Bytes of the ``frames`` entry that the frames covering rows r0..r1 use."""
        if not len(self.table):
            return 0, 0
        first, last = self._frames_of(r0, r1)
        return int(self.offsets[first]), int(self.offsets[last + 1])

    def _frames_of(self, r0, r1):
        starts = self.table[:, 0]
        first = int(np.searchsorted(starts, r0, side="right")) - 1
        last = int(np.searchsorted(starts, max(r0, r1 - 1), side="right")) - 1
        return max(first, 0), max(last, 0)

    def _decoder(self, i) -> FrameDecoder:
        r0, r1 = self.ranges[i]
        data = self.data[self.offsets[i]:self.offsets[i + 1]]
        try:
            return FrameDecoder(data, r1 - r0, self.rec.cols, self.rec.dtype,
                                int(self.table[i, 3]), int(self.table[i, 1]))
        except DiffError as exc:
            raise DiffError(f"frame {i}: {exc.message}", tensor=self.name) from None

    def _positions(self, i: int):
        if self.rec.encoding == "unchanged":
            r0, r1 = self.ranges[i]
            rows = r1 - r0 if self.rec.cols else 0  # no per-row arrays for empty rows
            return (np.zeros((rows, (self.rec.cols + 7) // 8), np.uint8),
                    np.zeros(rows, np.int64))
        try:
            return self._decoder(i).positions()
        except DiffError as exc:
            raise exc.located(tensor=self.name)

    def _values(self, i: int, base, idx) -> np.ndarray:
        """Frame ``i``'s kept values; ``idx`` are the kept positions (None: all)."""
        base_kept = None
        if base is not None:
            base_kept = base.reshape(-1) if idx is None else take_at(base, idx)
        try:
            out = self._decoder(i).values(base_kept)
        except DiffError as exc:
            raise exc.located(tensor=self.name)
        return out.view(dtypes.storage_dtype(self.rec.dtype))

    def positions(self, i: int):
        """(packed mask or None for all kept, row counts) of frame ``i``; the last frame
        asked for is kept (for one thread walking row ranges: not thread-safe)."""
        key = ("positions", i)
        if key not in self._cache:
            self._cache = {key: self._positions(i)}
        return self._cache[key]

    def values(self, i: int, base: np.ndarray | None) -> np.ndarray:
        """The kept values of frame ``i`` (storage dtype); ``base`` holds its base rows in
        the fine-tune's dtype (None where the tensor has no base). Cached like
        `positions`."""
        packed, counts = self.positions(i)
        key = ("values", i)
        if key not in self._cache:
            idx = None
            if packed is not None and base is not None:
                idx = kept_index(packed, self.rec.cols, counts)
            self._cache = {("positions", i): (packed, counts), key: self._values(i, base, idx)}
        return self._cache[key]

    def build_frame(self, i: int, out: np.ndarray, base: np.ndarray | None) -> None:
        """Write frame ``i``'s rebuilt rows into ``out`` [n, cols] (storage dtype); ``base``
        is the frame's base rows in that dtype (None when the tensor has no base).
        Thread-safe: frames of one tensor may be built on several threads at once."""
        if self.rec.encoding == "unchanged":
            if out is not base:  # rebuild reads the base rows into ``out`` already
                np.copyto(out, base)
            return
        packed, counts = self._positions(i)
        if packed is None or base is None:  # every position kept (rows without a base too)
            values = self._values(i, base, None)
            if values.size != out.size:
                self._bad(f"frame {i} keeps {values.size} of {out.size} positions without a base")
            out.reshape(-1)[:] = values
            return
        idx = kept_index(packed, self.rec.cols, counts)
        put_at(out, base, idx, self._values(i, base, idx))

    def frame_mask(self, i: int) -> np.ndarray:
        """Bool [n, cols] of frame ``i``'s kept positions. Thread-safe (no cache)."""
        packed, _ = self._positions(i)
        r0, r1 = self.ranges[i]
        if packed is None:
            return np.ones((r1 - r0, self.rec.cols), bool)
        return np.unpackbits(packed, axis=1, count=self.rec.cols, bitorder="little").view(bool)

    def kept_rows(self, r0: int, r1: int) -> np.ndarray:
        """Bool [r1 - r0, cols]: which positions of rows r0..r1 come from the diff."""
        rows, cols = self.rec.rows, self.rec.cols
        r0, r1 = max(0, r0), min(rows, r1)
        out = np.zeros((max(r1 - r0, 0), cols), bool)
        for i, (f0, f1) in enumerate(self.ranges):
            lo, hi = max(r0, f0), min(r1, f1)
            if lo >= hi:
                continue
            packed, _ = self.positions(i)
            if packed is None:
                out[lo - r0:hi - r0] = True
            else:
                out[lo - r0:hi - r0] = np.unpackbits(packed[lo - f0:hi - f0], axis=1, count=cols,
                                                     bitorder="little").view(bool)
        return out

    def kept_values(self, r0: int, r1: int, base_rows) -> np.ndarray:
        """The kept values of rows r0..r1, row-major; ``base_rows(f0, f1)`` gives base rows
        in the fine-tune's dtype (or None without a base)."""
        parts = []
        for i, (f0, f1) in enumerate(self.ranges):
            lo, hi = max(r0, f0), min(r1, f1)
            if lo >= hi or self.rec.encoding == "unchanged":
                continue
            _, counts = self.positions(i)
            values = self.values(i, base_rows(f0, f1))
            start = np.concatenate(([0], np.cumsum(counts)))
            parts.append(values[start[lo - f0]:start[hi - f0]])
        storage = dtypes.storage_dtype(self.rec.dtype)
        return np.concatenate(parts) if parts else np.zeros(0, storage)
