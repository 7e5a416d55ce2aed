"""Scores of the ranking rules as bins, for budgets that cross rows (docs/algorithm.md 6).

A tensor or global budget keeps the positions with the highest scores in a tensor, or in
every selected tensor at once. The scores are those of the row rules in
:mod:`.baselines`, widened the same way:

- ``delta``: ``|ft - base|`` (both widened to float32, subtracted in float32);
- ``magnitude``: ``|ft|``;
- ``random``: the top bits of a splitmix64 draw of ``(seed, salt, row_offset + row)``
  and the column: uniform, and independent of how a tensor is cut into blocks.

Each score becomes a **raw bin**: the top 14 bits of its float32 bit pattern
(``bits >> 17``), 0 to 16383, monotone in the score, 64 bins an octave (1/128 to 1/64
of the value wide); a random score's bin is the top 14 bits of its draw. Ranking is by
bin; equal bins are tied, and the positions of the bin where a count is met are taken
by a fixed rule (spread evenly over the bin in row-major order, or its first ones), so a
count is met exactly and the mask is deterministic.

Normalisation is a shift of the bins: a tensor whose typical score is ``s`` has its bins
moved down by ``raw_bin(s) - raw_bin(1.0)`` (:func:`shift_of`), so that a tensor scaled by
100 ranks like itself unscaled. Bin 0 (zero scores, and denormals below 2^-132) is never
moved: it stays below every other. Normalised bins run from 0 to 32767.
"""

from __future__ import annotations

import numpy as np

from ..errors import SelectionError
from ._inputs import as_array, as_u64, words
from ._jit import PARALLEL, njit, prange
from ._splitmix import mix64, row_state
from .baselines import raise_bad_rows, score_row

RAW_BINS = 1 << 14
"""Raw bins of a score: the top 14 bits of a non-negative float32 (or of a draw)."""
NORM_BINS = 1 << 15
"""Normalised bins: raw bins shifted by a tensor's shift, bin 0 held in place."""
_OFFSET = 8256  # puts raw 1..16383 minus any shift of a finite scale into 1..32767
_ONE = 127 << 6  # raw bin of 1.0f
_SHIFT_BITS = 17
_RULES = {"magnitude": 0, "delta": 1, "random": 2}
_ROWS_PER_BLOCK = 16
_CHUNK = 1 << 20  # positions a histogram counts at once


@njit(**PARALLEL)
def _bins_kernel(ft, ft_kind, base, base_kind, rule, seed, salt, row_offset, out, status):
    """Raw bins of every position into ``out`` (uint16 [rows, cols]).

    ``rule``: 0 magnitude, 1 delta (reads ``base``), 2 random (reads ``ft`` only to refuse
    NaN/Inf). ``status[i]`` becomes nonzero for a row with a NaN or Inf (see
    ``baselines.raise_bad_rows``). O(rows * cols), O(cols) scratch per block of rows,
    parallel over blocks of rows.
    """
    rows, n = out.shape
    nblocks = (rows + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    for blk in prange(nblocks):
        abits = np.empty(n, np.uint32)
        bbits = np.empty(n if rule == 1 else 0, np.uint32)
        wide = np.empty(n, np.uint64)
        for i in range(blk * _ROWS_PER_BLOCK, min(rows, (blk + 1) * _ROWS_PER_BLOCK)):
            status[i] = score_row(ft[i], ft_kind, base[i], base_kind, rule == 1, abits, bbits,
                                  wide)
            if status[i] != 0:
                continue
            if rule == 2:  # the draws replace the scores, which only checked the row
                state = row_state(seed, salt, row_offset + np.uint64(i))
                for j in range(n):
                    out[i, j] = np.uint16(mix64(state ^ np.uint64(j)) >> np.uint64(50))
            else:
                for j in range(n):
                    out[i, j] = np.uint16(abits[j] >> np.uint32(_SHIFT_BITS))


def raw_bins(method: str, ft_rows, base_rows=None, *, seed=0, salt=0,
             row_offset: int = 0) -> np.ndarray:
    """Raw bins (uint16 [rows, cols], 0..16383) of the scores of ``method`` on rows
    ``ft_rows`` [rows, cols] (``base_rows`` of the same shape for ``delta``).

    Inputs as for :func:`kenstream.kernels.select` (float32/64, float16, bf16 as uint16
    bits; read-only memory maps are read in place). Raises NonFiniteError naming the row
    ``row_offset + i`` of the first NaN or Inf. Cost O(rows * cols), parallel over rows.
    """
    rule = _RULES.get(method)
    if rule is None:
        raise SelectionError(f"method {method!r} has no score for a budget across rows",
                             hint="use delta, magnitude or random")
    ft, kind = as_array(ft_rows, "fine-tune rows")
    base, base_kind = ft, kind
    if rule == 1:
        if base_rows is None:
            raise SelectionError("method 'delta' needs the base rows")
        base, base_kind = as_array(base_rows, "base rows")
        if base.shape != ft.shape:
            raise SelectionError(f"base rows {base.shape} differ from fine-tune rows {ft.shape}")
    out = np.empty(ft.shape, np.uint16)
    status = np.zeros(ft.shape[0], np.uint8)
    if out.size:
        _bins_kernel(words(ft), kind, words(base), base_kind, rule, as_u64(seed, "seed"),
                     as_u64(salt, "salt"), as_u64(int(row_offset), "row_offset"), out, status)
    raise_bad_rows(status, row_offset)
    return out


def histogram(bins: np.ndarray) -> np.ndarray:
    """int64 [RAW_BINS]: how many positions fall in each raw bin. Counted in chunks, so
    the index array NumPy makes is 8 MB whatever the size of ``bins``."""
    flat = bins.reshape(-1)
    out = np.zeros(RAW_BINS, np.int64)
    for i in range(0, flat.size, _CHUNK):
        out += np.bincount(flat[i:i + _CHUNK], minlength=RAW_BINS)
    return out


def shift_of(hist: np.ndarray) -> int:
    """The normalising shift of a tensor with raw-bin histogram ``hist``.

    The scale is the root mean square of the scores, taken from the histogram (each bin
    counted at its middle, so within 1 % of the exact value): ``raw_bin(rms) -
    raw_bin(1.0)``. A tensor of zero scores has shift 0. Deterministic: a fixed-order
    float64 sum over integer counts."""
    if int(hist[1:].sum()) == 0:
        return 0
    finite = 0x7F800000 >> _SHIFT_BITS  # bins from here on hold Inf and NaN: no score
    mids = np.zeros(RAW_BINS - 1, np.float64)
    mids[:finite - 1] = ((np.arange(1, finite, dtype=np.uint32) << np.uint32(_SHIFT_BITS))
                         | np.uint32(1 << (_SHIFT_BITS - 1))).view(np.float32)
    mean_square = float(np.dot(hist[1:].astype(np.float64), mids * mids)) / int(hist.sum())
    rms = np.float32(np.sqrt(mean_square))
    if not np.isfinite(rms) or rms == 0:
        return 0
    return int(rms.view(np.uint32) >> np.uint32(_SHIFT_BITS)) - _ONE


def normalise_hist(hist: np.ndarray, shift: int) -> np.ndarray:
    """The raw histogram ``hist`` moved into normalised bins (int64 [NORM_BINS])."""
    out = np.zeros(NORM_BINS, np.int64)
    out[0] = hist[0]
    start = 1 - shift + _OFFSET
    out[start:start + RAW_BINS - 1] = hist[1:]
    return out


def cut_of(hist: np.ndarray, target: int) -> tuple[int, int]:
    """(bin c, quota q) such that the positions above bin ``c`` plus ``q`` of those in
    bin ``c`` number exactly ``min(target, hist.sum())``. ``c = -1`` keeps everything."""
    above = np.cumsum(hist[::-1])[::-1]  # above[c] = positions in bins >= c
    if target >= int(above[0]):
        return -1, 0
    # the lowest c whose bins >= c hold more than target: those in bins > c fit.
    c = int(np.flatnonzero(above > target)[-1])
    over = int(above[c + 1]) if c + 1 < hist.size else 0
    return c, int(target) - over


def mask_of(bins: np.ndarray, shift: int, cut: int, quota: int, seen: int,
            count: int | None = None) -> tuple[np.ndarray, int]:
    """(keep mask, positions of the cut bin seen so far) for a block of raw ``bins``
    [rows, cols] of a tensor with ``shift``: every position whose normalised bin is above
    ``cut``, and ``quota`` of the tensor's positions in bin ``cut`` (``seen`` of them are in
    the blocks before this one). With ``count`` (the tensor's positions in the bin), the
    quota is spread evenly over them in row-major order: the ``j``-th is taken when
    ``floor((j + 1) q / count) > floor(j q / count)``; without it, the first ``quota`` are
    taken. Compared in raw bins (normalised bin ``b - shift + offset``, 0 for raw 0), so no
    normalised copy is made. O(rows * cols); memory: the mask and the cut bin's
    positions."""
    if cut < 0:
        return np.ones(bins.shape, np.bool_), seen
    # raw bin of the cut: 0 for the zero bin; <= 0 when the tensor has nothing that low
    raw = 0 if cut == 0 else cut + shift - _OFFSET
    mask = bins > max(raw, 0)
    if cut == 0 or raw >= 1:
        tied = np.flatnonzero(bins.reshape(-1) == raw)
        mask.reshape(-1)[tied[_taken(seen, tied.size, quota, count)]] = True
        seen += int(tied.size)
    return mask, seen


def _taken(seen: int, n: int, quota: int, count: int | None) -> np.ndarray | slice:
    """Which of the ``n`` cut-bin positions after the first ``seen`` are kept."""
    if count is None:
        return slice(0, max(0, min(n, quota - seen)))
    if n and count * quota >= 1 << 63:  # past int64: Python integers, exactly
        j = np.arange(seen, seen + n + 1, dtype=np.int64).astype(object)
    else:
        j = np.arange(seen, seen + n + 1, dtype=np.int64)
    # floor(j q / count) for j = seen .. seen + n; a step up marks a kept position
    steps = j * quota // max(count, 1)
    return np.flatnonzero(np.diff(steps) > 0)
