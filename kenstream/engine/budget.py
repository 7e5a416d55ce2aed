"""Budgets across rows: the first pass of a tensor or global budget, and its cuts.

``--budget tensor`` and ``--budget global`` (docs/algorithm.md section 6) keep the
positions with the highest scores of a ranking rule across whole tensors, or across every
selected tensor. Before anything is written, :func:`gather` streams each selected tensor
once, in row blocks, and keeps a histogram of its scores' bins (memory: one histogram a
tensor, at most 32768 counts, trimmed to the bins it fills). :func:`allocate` then finds,
from the histograms alone, a *cut* for every tensor: ``(shift, bin, quota, count)``: keep
every position whose normalised bin is above ``bin``, and ``quota`` of the ``count``
positions in that bin, chosen by the tie mode. The totals come out exact. The cuts are the plan's (recorded in the plan file
and handed to every shard writer, under any executor), so the write pass, wherever it
runs, selects the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import KenstreamError
from ..format import spec
from ..io.rows import TensorRows, identical
from ..kernels import scores
from .plan import base_rows, selection_error, tensor_salt


@dataclass(frozen=True)
class TensorScores:
    """One tensor's first pass: its shift and its normalised histogram, trimmed to the
    bins from ``lo`` on that hold anything."""

    shift: int
    lo: int
    counts: np.ndarray

    def hist(self) -> np.ndarray:
        out = np.zeros(scores.NORM_BINS, np.int64)
        out[self.lo:self.lo + self.counts.size] = self.counts
        return out

    def at(self, b: int) -> int:
        i = b - self.lo
        return int(self.counts[i]) if 0 <= i < self.counts.size else 0


def gather(ft, base, items, settings, progress, block_elems: int = spec.DEFAULT_BLOCK_ELEMS
           ) -> dict:
    """name -> TensorScores for every selected tensor of plan ``items`` that changed
    (an unchanged one is written as such and takes no budget). Reads each once, in row
    blocks of about ``block_elems`` values, releasing pages as it goes; the rows of a
    resized tensor beyond its base are kept whole and take no part. Cost: one read of
    the selected tensors and O(values) work, parallel over rows."""
    out = {}
    for item in items:
        if item.action != "select":
            continue
        rows, brows = TensorRows(ft, item.name, item.rows, item.cols), base_rows(base, item)
        if item.base_rows is None and identical(rows, brows, block_elems=block_elems):
            progress.update(item.params)
            continue
        hist = np.zeros(scores.RAW_BINS, np.int64)
        for r0, r1 in spec.row_blocks(item.with_base, item.cols, block_elems):
            hist += scores.histogram(block_bins(item, rows, brows, r0, r1, settings))
            rows.release(r0, r1)
            brows.release(r0, r1)
            progress.update((r1 - r0) * item.cols)
        progress.update((item.rows - item.with_base) * item.cols)
        shift = 0 if settings.method == "random" else scores.shift_of(hist)
        norm = scores.normalise_hist(hist, shift)
        held = np.flatnonzero(norm)
        lo = int(held[0]) if held.size else 0
        hi = int(held[-1]) + 1 if held.size else 0
        out[item.name] = TensorScores(shift, lo, norm[lo:hi].copy())
    return out


def block_bins(item, rows, brows, r0, r1, settings) -> np.ndarray:
    """Raw bins of rows r0..r1 of ``item`` by the settings' rule, errors located."""
    try:
        return scores.raw_bins(settings.method, rows.raw(r0, r1),
                               brows.read(r0, r1) if settings.method == "delta" else None,
                               seed=settings.seed, salt=tensor_salt(item.name), row_offset=r0)
    except KenstreamError as exc:
        raise selection_error(exc, item, rows, brows)


def allocate(stats: dict, items, settings) -> dict:
    """name -> ``[shift, bin, quota, count]``: the cut of every tensor in ``stats``, such
    that each tensor keeps exactly its ``settings.target`` (``tensor``) or all of them keep
    exactly the sum of their targets (``global``); ``count`` is the tensor's positions in
    its cut bin. Which of those it keeps follows ``settings.ties`` (docs/algorithm.md 6):
    ``scrambled``, the quota is shared among tensors in proportion to ``count`` and spread
    evenly over each one's bin; ``positions``, it goes to tensors in plan order and to each
    one's first positions; ``values``, every position of the bin is kept (where the
    quota is not 0). O(tensors *
    bins), no data read."""
    named = [i for i in items if i.name in stats]
    targets = {i.name: settings.target(i.with_base, i.cols) for i in named}
    if settings.budget == "tensor":
        out = {}
        for i in named:
            s = stats[i.name]
            cut, quota = scores.cut_of(s.hist(), targets[i.name])
            count = 0 if cut < 0 else s.at(cut)
            whole = settings.ties == "values" and quota > 0
            out[i.name] = [s.shift, cut, count if whole else quota, count]
        return out
    total = np.zeros(scores.NORM_BINS, np.int64)
    for i in named:
        s = stats[i.name]
        total[s.lo:s.lo + s.counts.size] += s.counts
    cut, left = scores.cut_of(total, sum(targets.values()))
    counts = [0 if cut < 0 else stats[i.name].at(cut) for i in named]
    return {i.name: [stats[i.name].shift, cut, quota, count]
            for i, quota, count in zip(named, _shares(left, counts, settings.ties), counts)}


def _shares(quota: int, counts: list, ties: str) -> list:
    """The global cut bin's ``quota`` shared among tensors holding ``counts`` of it."""
    if ties == "values":  # the whole bin, if any of it is kept
        return [n if quota else 0 for n in counts]
    if ties == "positions":
        out = []
        for n in counts:
            out.append(min(quota, n))
            quota -= out[-1]
        return out
    # floor(quota * before / total) steps: in proportion, exact in sum, no sort
    total, before, out = max(sum(counts), 1), 0, []
    for n in counts:
        out.append((before + n) * quota // total - before * quota // total)
        before += n
    return out


class Cutter:
    """The write pass of one tensor under its cut: masks block by block, in row order
    (the cut bin's positions are counted across blocks)."""

    def __init__(self, item, cut, settings):
        self.item, self.settings = item, settings
        self.shift, self.bin, self.quota, count = (int(v) for v in cut)
        self.count = count if settings.ties == "scrambled" else None
        self.seen = 0

    def mask(self, rows, brows, r0, r1) -> np.ndarray:
        bins = block_bins(self.item, rows, brows, r0, r1, self.settings)
        mask, self.seen = scores.mask_of(bins, self.shift, self.bin, self.quota, self.seen,
                                         self.count)
        return mask
