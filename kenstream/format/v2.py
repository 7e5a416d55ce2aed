"""Format 2's frames: a stored tensor as independently coded row ranges (docs/format.md 6).

No I/O. :func:`encode_frame` turns the rows of one frame (the fine-tuned rows, the base
rows in the fine-tune's dtype, and which positions are kept) into bytes;
:class:`FrameDecoder` checks a frame against its table row and decodes its positions
and values. Entropy coding is zstd (the ``zstandard`` library), one compressor per
thread; the per-value work is done by the numba kernels of :mod:`kenstream.kernels.codec`.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from .. import dtypes
from ..errors import DiffError
from ..kernels import cached, codec
from ..kernels.pack import pack_pair, pack_rows, padding_bits_set, row_counts, row_popcounts
from .spec import DEFAULT_LEVEL

POS_BITMASK, POS_GAPS, POS_NONE = 1, 2, 3
VAL_DELTA, VAL_PLANES = 1, 2

DELTA_HEAD = struct.Struct("<BBHfIIII")
"""Values header of a delta frame: kind, centre exponent, reserved, scale (float32),
crc32 of the kept values, bytes of the zstd nibbles, of the zstd escapes, of raw bits;
then the rank table (CONTEXTS x RANKS bytes)."""
PLANES_HEAD = struct.Struct("<BBHI")
"""Values header of a planes frame: kind, planes, reserved, crc32; then one uint32 byte
count per plane."""
TABLE_COLUMNS = 4
"""A frame-table row: first row, positions bytes, values bytes, kept values."""

_SPARSE = 32  # below 1 kept position in 32, column gaps are tried beside the bitmask
_local = threading.local()


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at ``level`` (compressors are not thread-safe)."""
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                write_checksum=False)
    return cache[level]


def _width(code: str) -> tuple[int, bool]:
    return dtypes.itemsize(code) * 8, dtypes.is_float(code)


@dataclass(frozen=True)
class Frame:
    """One coded frame: its bytes and the table row that describes it."""

    data: bytes
    positions: int
    values: int
    kept: int
    counts: np.ndarray  # kept values per row


def _positions(mask, packed, counts, level) -> bytes:
    kept = int(counts.sum())
    if kept == 0:
        return bytes([POS_NONE])
    if kept == mask.size:
        return b""
    zc = compressor(level)
    best = bytes([POS_BITMASK]) + zc.compress(packed)
    if kept * _SPARSE < mask.size:
        flat = np.flatnonzero(mask.reshape(-1)).astype(np.uint32)
        gaps = np.diff(flat, prepend=np.uint32(0)).astype("<u4")
        gaps[1:] -= np.uint32(1)  # the first holds the position, the rest gap - 1
        candidate = bytes([POS_GAPS]) + zc.compress(gaps)
        if len(candidate) < len(best):
            best = candidate
    return best


def _delta(a, p, code, level) -> bytes:
    w, is_float = _width(code)
    n = a.size
    scale = np.float32(1.0)
    if code == "F32" and n:
        scale = codec.fit_scale(a, p)
        if scale != np.float32(1.0):
            scaled = np.empty_like(p)
            codec.scale_f32(p, scale, scaled)
            p = scaled
    lengths = np.empty(n, np.uint8)
    words = np.empty(n * max(w - 1, 1) // 64 + 1, np.uint64)
    bits = codec.encode_lengths(a, p, w, is_float, lengths, words)
    centre = codec.median_exponent(p, w)
    table = np.empty(codec.CONTEXTS * codec.RANKS, np.uint8)
    nibbles = np.zeros((n + 1) // 2, np.uint8)
    escapes = np.empty(n, np.uint8)
    found = codec.context_pack(lengths, p, w, centre, table, nibbles, escapes)
    zc = compressor(level)
    znib = zc.compress(nibbles)
    zesc = zc.compress(escapes[:found]) if found else b""
    raw = words.view(np.uint8)[:(bits + 7) // 8].tobytes()
    head = DELTA_HEAD.pack(VAL_DELTA, centre, 0, scale, zlib.crc32(a), len(znib), len(zesc),
                           len(raw))
    return head + table.tobytes() + znib + zesc + raw


def _planes(a, level) -> bytes:
    width = a.itemsize
    planes = a.view(np.uint8).reshape(-1, width)
    zc = compressor(level)
    parts = [zc.compress(np.ascontiguousarray(planes[:, i])) for i in range(width)]
    head = PLANES_HEAD.pack(VAL_PLANES, width, 0, zlib.crc32(a))
    return head + struct.pack(f"<{width}I", *map(len, parts)) + b"".join(parts)


def encode_frame(ft: np.ndarray, base: np.ndarray | None, mask: np.ndarray | None, code: str,
                 level: int = DEFAULT_LEVEL) -> Frame:
    """Code one frame: ``ft`` [n, cols] (storage dtype of ``code``), ``base`` the same rows
    of the base in that dtype (None: no base, values as byte planes), ``mask`` bool
    [n, cols] of kept positions (None: every position). O(n * cols)."""
    n, cols = ft.shape
    bits = np.dtype(f"u{ft.itemsize}")
    if mask is None:
        counts = np.full(n, cols, np.int64)
        positions = b""
        a = np.ascontiguousarray(ft).reshape(-1).view(bits)
        p = None if base is None else np.ascontiguousarray(base).reshape(-1).view(bits)
    else:
        counts = row_counts(mask)
        if base is None:
            packed, a = pack_rows(mask, ft, counts)
            p = None
        else:
            packed, a, p = pack_pair(mask, ft, base, counts)
            p = p.view(bits)
        a = a.view(bits)
        positions = _positions(mask, packed, counts, level)
    kept = int(counts.sum())
    if kept == 0:
        values = b""
    elif p is None:
        values = _planes(a, level)
    else:
        values = _delta(a, p, code, level)
    return Frame(positions + values, len(positions), len(values), kept, counts)


def coder_compiled() -> bool:
    """Whether the value coder's kernels are in numba's on-disk cache (else the first
    frame coded in this process compiles them, a few seconds)."""
    return cached(codec.context_pack)


def decoder_compiled() -> bool:
    """Whether the value decoder's kernels are in numba's on-disk cache (else the first
    frame decoded in this process compiles them, about 4 s on 2 cores)."""
    return cached(codec.context_unpack)


def warm_up(code: str) -> None:
    """Code small frames of dtype ``code`` as compress does, so the kernels a tensor of
    that dtype runs are compiled now (see `kernels.warm_up`): with half the positions
    kept (a selected tensor) and whole against the base (a stored one). The inputs are
    read-only views, as compress's are (numba compiles those apart); for F32 the frames
    are coded both with a scaled prediction (the fine-tune is the base times 0.98) and
    without one."""
    storage = dtypes.storage_dtype(code)
    if code == "F32":
        base = np.linspace(0.5, 2.0, 16, dtype=np.float32)
        fts = [base[::-1].copy(), base * np.float32(0.98)]
    else:
        base = np.arange(1000, 1016).astype(storage)
        fts = [base[::-1].copy()]
    mask = np.zeros((2, 8), bool)
    mask[:, ::2] = True
    base = base.view(storage).reshape(2, 8)
    base.setflags(write=False)
    for ft in fts:
        ft = ft.view(storage).reshape(2, 8)
        ft.setflags(write=False)
        encode_frame(ft, base, mask, code)
        encode_frame(ft, base, None, code)


# -- reading ---------------------------------------------------------------------------------

def _unzstd(data, expected: int, what: str) -> np.ndarray:
    """Decompress one zstd frame of exactly ``expected`` bytes, allocating no more; the
    frame must fill ``data`` exactly."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise DiffError(f"{what} is not a zstd frame") from None
    if size != expected:
        raise DiffError(f"{what} holds {size} bytes, {expected} expected")
    if expected == 0:
        return np.zeros(0, np.uint8)
    obj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = obj.decompress(data)
    except zstandard.ZstdError as exc:
        raise DiffError(f"{what} is damaged ({exc})") from None
    if len(out) != expected or not obj.eof or obj.unused_data:
        raise DiffError(f"{what} does not end where its length says")
    return np.frombuffer(out, np.uint8)


class FrameDecoder:
    """One frame's bytes, checked against its table row as they are decoded.

    ``rows`` x ``cols`` positions of dtype ``code``; ``kept`` values, ``positions`` bytes
    of positions then the values. Every length is checked before it is used, every zstd
    frame must declare exactly the size expected, and the decoded values must match the
    frame's crc32, so a damaged or forged frame raises DiffError (never a wrong model).
    """

    def __init__(self, data, rows: int, cols: int, code: str, kept: int, positions: int):
        self.data, self.rows, self.cols, self.code, self.kept = data, rows, cols, code, kept
        self.pos_bytes = positions
        self.width, self.is_float = _width(code)
        if kept > rows * cols:
            raise DiffError(f"frame keeps {kept} of {rows * cols} positions")

    def positions(self):
        """(packed mask uint8 [rows, ceil(cols/8)] or None when every position is kept,
        kept count of each row)."""
        rows, cols, kept = self.rows, self.cols, self.kept
        sec = self.data[:self.pos_bytes]
        if not len(sec):
            if kept != rows * cols:
                raise DiffError("frame stores no positions but does not keep every one")
            # No values: no per-row counts either (the rows may number 2**58).
            return None, np.full(rows if cols else 0, cols, np.int64)
        kind, payload = sec[0], sec[1:]
        width = (cols + 7) // 8
        if kind == POS_NONE and not len(payload) and kept == 0:
            return np.zeros((rows, width), np.uint8), np.zeros(rows, np.int64)
        if kind == POS_BITMASK:
            packed = _unzstd(payload, rows * width, "frame mask").reshape(rows, width)
        elif kind == POS_GAPS:
            gaps = _unzstd(payload, 4 * kept, "frame column gaps").view("<u4").astype(np.int64)
            flat = np.cumsum(gaps + 1) - 1
            if kept and (flat[-1] >= rows * cols or (gaps[1:] + 1 <= 0).any()):
                raise DiffError("frame column gaps run past the frame")
            mask = np.zeros(rows * cols, bool)
            mask[flat] = True
            packed = np.packbits(mask.reshape(rows, cols), axis=1, bitorder="little")
        else:
            raise DiffError(f"frame positions of unknown kind {kind}")
        if padding_bits_set(packed, cols):
            raise DiffError("frame mask has bits set past the end of a row")
        counts = row_popcounts(packed)
        if int(counts.sum()) != kept:
            raise DiffError("frame mask bit count does not match its kept count")
        return packed, counts

    def values(self, base_kept: np.ndarray | None) -> np.ndarray:
        """The ``kept`` fine-tuned values (unsigned ints of the dtype's width), given the
        base values at the kept positions (needed by delta frames)."""
        bits = np.dtype(f"u{self.width // 8}")
        sec = self.data[self.pos_bytes:]
        if self.kept == 0:
            if len(sec):
                raise DiffError("frame keeps nothing but stores values")
            return np.zeros(0, bits)
        if not len(sec):
            raise DiffError("frame stores no values")
        if sec[0] == VAL_DELTA:
            out = self._delta(sec, base_kept, bits)
            crc = DELTA_HEAD.unpack_from(sec)[4]
        elif sec[0] == VAL_PLANES:
            out = self._planes(sec, bits)
            crc = PLANES_HEAD.unpack_from(sec)[3]
        else:
            raise DiffError(f"frame values of unknown kind {sec[0]}")
        if zlib.crc32(out) != crc:
            raise DiffError("frame values do not match their checksum")
        return out

    def _delta(self, sec, base_kept, bits) -> np.ndarray:
        n, w = self.kept, self.width
        tab = codec.CONTEXTS * codec.RANKS
        if len(sec) < DELTA_HEAD.size + tab:
            raise DiffError("frame values header is cut short")
        _, centre, _, scale, _, lnib, lesc, lraw = DELTA_HEAD.unpack_from(sec)
        at = DELTA_HEAD.size
        table = np.frombuffer(sec, np.uint8, tab, at)
        at += tab
        if at + lnib + lesc + lraw != len(sec):
            raise DiffError("frame values lengths do not add up")
        if base_kept is None or base_kept.size != n:
            raise DiffError("frame values are coded against a base that is not given")
        p = np.ascontiguousarray(base_kept).reshape(-1).view(bits)
        scale = np.float32(scale)
        if scale != np.float32(1.0):
            lo, hi = codec.SCALE_RANGE
            if self.code != "F32" or not lo <= scale <= hi:
                raise DiffError(f"frame scale {scale} is not allowed for {self.code}")
            scaled = np.empty_like(p)
            codec.scale_f32(p, scale, scaled)
            p = scaled
        nibbles = _unzstd(sec[at:at + lnib], (n + 1) // 2, "frame lengths")
        if n & 1 and nibbles[-1] >> 4:
            raise DiffError("frame lengths have a symbol past the last value")
        wanted = int(np.count_nonzero((nibbles & 15) == codec.ESCAPE)
                     + np.count_nonzero((nibbles >> 4) == codec.ESCAPE))
        escapes = (_unzstd(sec[at + lnib:at + lnib + lesc], wanted, "frame escapes")
                   if lesc else np.zeros(0, np.uint8))
        if escapes.size != wanted:
            raise DiffError("frame escapes do not match its lengths")
        lengths = np.empty(n, np.uint8)
        if codec.context_unpack(nibbles, escapes, table, p, w, centre, lengths) != escapes.size:
            raise DiffError("frame lengths name unused ranks or escapes that do not match")
        need = codec.raw_bits_needed(lengths)
        if (need + 7) // 8 != lraw or (need % 8 and sec[len(sec) - 1] >> (need % 8)):
            raise DiffError("frame raw bits do not match its lengths")
        words = np.zeros(lraw // 8 + 2, np.uint64)
        words.view(np.uint8)[:lraw] = np.frombuffer(sec, np.uint8, lraw, at + lnib + lesc)
        out = np.empty(n, bits)
        codec.decode_lengths(lengths, words, p, w, self.is_float, out)
        return out

    def _planes(self, sec, bits) -> np.ndarray:
        n, width = self.kept, self.width // 8
        if len(sec) < PLANES_HEAD.size + 4 * width or sec[1] != width:
            raise DiffError("frame planes header does not fit the dtype")
        sizes = struct.unpack_from(f"<{width}I", sec, PLANES_HEAD.size)
        at = PLANES_HEAD.size + 4 * width
        if at + sum(sizes) != len(sec):
            raise DiffError("frame planes lengths do not add up")
        out = np.empty((n, width), np.uint8)
        for i, size in enumerate(sizes):
            out[:, i] = _unzstd(sec[at:at + size], n, "frame byte plane")
            at += size
        return out.reshape(-1).view(bits)
