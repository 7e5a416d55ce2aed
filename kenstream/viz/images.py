"""KENviz images: the arrays the views draw, computed from a diff with NumPy alone.

A matrix-like view is a :class:`MatrixImage`: one value per position, or per ``br x bc``
block of positions when the tensor is larger than the pixel budget on either side (the
block's kept fraction, or the mean value / change / neighbour count over its kept
positions). Images are computed by streaming row blocks of the diff through the engine's
block layer (:class:`kenstream.engine.blocks.TensorBlocks`, which checks every entry
first), so memory stays near ``block_elems`` booleans whatever the tensor size. Also here:
layer-name templates and the per-tensor / per-layer summary table. No matplotlib: the
figures are drawn by :mod:`kenstream.viz.draw`.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import dtypes
from ..engine.blocks import TensorBlocks
from ..engine.info import layer_of, layer_order
from ..errors import KenstreamError
from ..io.diff_reader import DiffReader
from ..io.rows import TensorRows
from . import COLORS

BLOCK_ELEMS = 1 << 22
"""Rows are streamed in blocks of about this many positions (4 M booleans, 16 MB as
float32)."""

MAX_ROW_BLOCK = 1 << 31
"""The most positions one streamed block may hold: a block is at least one pixel row of
whole tensor rows, so a record claiming rows of ``2**58`` columns is refused here rather
than allocated (no real tensor comes near: it would be a 1-D tensor of 2 G values)."""

MAX_SUGGEST_CHARS = 256
"""A tensor name longer than this gets no "did you mean" suggestion."""


@dataclass(frozen=True)
class MatrixImage:
    """What a matrix-like view draws.

    ``data``: float64 [H, W], NaN where blank (nothing kept). ``kind``: ``mask`` (1.0 =
    kept), ``value``, ``change``, ``neighbors`` (0..4) or, on aggregated views, ``fraction``
    (kept fraction of the block), ``mean value``, ``mean change``, ``mean neighbors``.
    ``block``: positions per pixel (rows, cols); ``shape``: the tensor's (rows, cols).
    """

    data: np.ndarray
    kind: str
    block: tuple
    shape: tuple
    kept: int

    @property
    def aggregated(self) -> bool:
        return self.block != (1, 1)

    @property
    def scale(self) -> str:
        return f"1 pixel = {self.block[0]} x {self.block[1]} positions (rows x columns)"


# -- pure NumPy helpers (no I/O) -------------------------------------------------------

def pixel_blocks(rows: int, cols: int, max_pixels: int) -> tuple:
    """Positions per pixel (br, bc) so that the image is at most ``max_pixels`` per side."""
    return max(1, -(-rows // max_pixels)), max(1, -(-cols // max_pixels))


def block_sums(a: np.ndarray, br: int, bc: int) -> np.ndarray:
    """Sums of ``a`` [n, C] (bool, int or float) over blocks of ``br x bc``; the last row
    and column of blocks may be partial. Returns float64 [ceil(n / br), ceil(C / bc)].

    Cost O(n * C), plus one zero-padded copy when a side is not a multiple of its block.
    """
    n, c = a.shape
    h, w = -(-n // br), -(-c // bc)
    if a.dtype == bool:
        a = a.view(np.uint8)  # sums of uint8 views are several times faster than of bool
    if (h * br, w * bc) != (n, c):
        padded = np.zeros((h * br, w * bc), dtype=a.dtype)
        padded[:n, :c] = a
        a = padded
    acc = np.float64 if a.dtype.kind == "f" else np.int64
    rows = a.reshape(h, br, w * bc).sum(axis=1, dtype=acc)
    return rows.reshape(h, w, bc).sum(axis=2).astype(np.float64)


def block_sizes(rows: int, cols: int, br: int, bc: int) -> np.ndarray:
    """Positions in each block of a [rows, cols] matrix cut into ``br x bc`` blocks."""
    h = np.minimum(br, rows - np.arange(0, rows, br))
    w = np.minimum(bc, cols - np.arange(0, cols, bc))
    return np.outer(h, w).astype(np.float64)


def _kept_neighbors(mask: np.ndarray) -> np.ndarray:
    """uint8 [R, C]: kept 4-neighbours of every position of bool ``mask``, kept or not."""
    m = mask.view(np.uint8)
    out = np.zeros(m.shape, dtype=np.uint8)
    out[1:] += m[:-1]
    out[:-1] += m[1:]
    out[:, 1:] += m[:, :-1]
    out[:, :-1] += m[:, 1:]
    return out


def neighbor_counts(mask: np.ndarray) -> np.ndarray:
    """For bool ``mask`` [R, C]: int8 [R, C], the number of kept 4-neighbours (up, down,
    left, right, inside the matrix) of each kept position, -1 at reset positions. O(R * C)."""
    mask = np.asarray(mask, dtype=bool)
    return np.where(mask, _kept_neighbors(mask), np.int8(-1)).astype(np.int8)


def layer_pattern(tensor: str):
    """(regex, template) for a name with ``{n}``, or a real name whose first numbered
    dot-separated component stands for the layer."""
    if "{n}" in tensor:
        pre, _, post = tensor.partition("{n}")
    else:
        m = re.search(r"(?:^|\.)(\d+)(?=\.|$)", tensor)
        if m is None:
            raise KenstreamError("has no layer number to vary", tensor=tensor,
                                 hint="write the layer as {n}, e.g. encoder.layer.{n}.weight")
        pre, post = tensor[:m.start(1)], tensor[m.end(1):]
    return re.compile(re.escape(pre) + r"(\d+)" + re.escape(post)), pre + "{n}" + post


def layer_tensors(names, tensor: str) -> dict:
    """{layer number: tensor name} of every name matching ``tensor``'s template, sorted."""
    regex, _ = layer_pattern(tensor)
    found = {}
    for name in names:
        m = regex.fullmatch(name)
        if m is not None and len(m.group(1)) <= 18:  # a layer number, not a digit flood
            found.setdefault(int(m.group(1)), name)
    return dict(sorted(found.items()))


def summary_table(records: dict) -> tuple:
    """Per tensor and per layer: params, kept, kept fraction and diff bytes.

    Returns (tensors, layers): two dicts name -> {"params", "kept", "fraction", "bytes"};
    layers are in numeric order with "other" last.
    """
    tensors, layers = {}, {}
    for name, rec in records.items():
        params = rec.params
        row = {"params": params, "kept": rec.kept, "bytes": rec.nbytes}
        tensors[name] = dict(row, fraction=row["kept"] / params if params else 0.0)
        acc = layers.setdefault(layer_of(name), {"params": 0, "kept": 0, "bytes": 0})
        for key in acc:
            acc[key] += row[key]
    layers = {k: dict(layers[k], fraction=layers[k]["kept"] / layers[k]["params"]
                      if layers[k]["params"] else 0.0) for k in layer_order(layers)}
    return tensors, layers


def _as_f32(arr: np.ndarray, code: str) -> np.ndarray:
    if dtypes.is_float(code) and code != "F64":
        return dtypes.widen_to_f32(arr, code)
    return arr.astype(np.float32)  # display only: integers and F64 need no exact form


# -- streaming over a diff --------------------------------------------------------------

def _record(reader: DiffReader, tensor):
    if tensor is None:
        raise KenstreamError("this view needs a tensor name", hint="pass --tensor NAME")
    rec = reader.records.get(tensor)
    if rec is None:
        # Similarity is quadratic in the name's length: suggest only for names of sane size.
        close = (difflib.get_close_matches(tensor, list(reader.records), n=1)
                 if len(tensor) <= MAX_SUGGEST_CHARS else [])
        hint = f"did you mean {close[0]!r}?" if close else "kenstream info DIFF lists the tensors"
        raise KenstreamError("no such tensor in the diff", file=reader.path, tensor=tensor,
                             hint=hint)
    return rec


def _row_blocks(rows: int, cols: int, br: int, block_elems: int):
    # Whole pixel rows per block, so no block of ``br`` rows straddles two row blocks.
    step = max(br, (block_elems // max(cols, 1)) // br * br)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _base_rows(base, rec, tensor) -> TensorRows:
    """The base tensor as rows in its own dtype, for change colouring."""
    if rec.base_name is None:
        why = ("changed shape from the base's, so the diff stores it whole"
               if rec.reason == "reshaped" else "is new in the fine-tune")
        raise KenstreamError(f"{why}; it has no base values to compare",
                             tensor=tensor, hint="use --color value")
    info = base.info(rec.base_name)
    if math.prod(info.shape) != rec.params:
        raise KenstreamError(f"base tensor {rec.base_name!r} has shape {list(info.shape)}, "
                             f"the diff {list(rec.shape)}", tensor=tensor)
    return TensorRows(base, rec.base_name, rec.rows, rec.cols)


def _image(reader, tensor, *, base=None, color="value", max_pixels=1024, neighbors=False,
           block_elems=BLOCK_ELEMS):
    """MatrixImage of one tensor, streamed over row blocks of about ``block_elems``
    positions; see :func:`matrix_image`."""
    rec = _record(reader, tensor)
    if color == "change" and base is None and not neighbors:
        raise KenstreamError("colouring by change needs the base", tensor=tensor,
                             hint="pass --base BASE")
    rows, cols = rec.rows, rec.cols
    if rows * cols == 0:
        raise KenstreamError("has no elements; there is nothing to draw", tensor=tensor)
    reader.check_hashes(tensors=[tensor])  # as rebuild does, for the shards drawn from
    br, bc = pixel_blocks(rows, cols, max_pixels)
    if br * cols > MAX_ROW_BLOCK:
        raise KenstreamError(f"a row of {cols} positions is too long to draw (record "
                             "forged?)", file=reader.path, tensor=tensor)
    # The base decodes format 2's kept values (coded against it); the mask needs none.
    blocks = TensorBlocks(tensor, reader, base if not neighbors else None, block_elems)
    base_rows = _base_rows(base, rec, tensor) if base is not None and color == "change" else None
    kept_sum = np.zeros((-(-rows // br), -(-cols // bc)))
    total = np.zeros_like(kept_sum)
    kept_total = 0
    try:
        for r0, r1 in _row_blocks(rows, cols, br, block_elems):
            if neighbors:
                # One row of overlap above and below, so counts at block seams are exact.
                top = 1 if r0 > 0 else 0
                ext = blocks.kept_rows(r0 - 1, r1 + 1)
                mask = ext[top:top + r1 - r0]
                weight = _kept_neighbors(ext)[top:top + r1 - r0] * mask.view(np.uint8)
            else:
                mask = blocks.kept_rows(r0, r1)
            n = int(np.count_nonzero(mask))
            if base is not None and not neighbors:
                weight = np.zeros(mask.shape, np.float32)
                if n:
                    weight[mask] = _as_f32(blocks.kept_values(r0, r1), rec.dtype)
                if base_rows is not None:
                    # Whole-block arithmetic: cheaper than gathering base values at the mask.
                    weight -= np.where(mask, _as_f32(base_rows.raw(r0, r1), base_rows.stored), 0)
                    base_rows.release(r0, r1)
            p0 = r0 // br
            kept_sum[p0:p0 + -(-(r1 - r0) // br)] = block_sums(mask, br, bc)
            if neighbors or base is not None:
                total[p0:p0 + -(-(r1 - r0) // br)] = block_sums(weight, br, bc)
            kept_total += n
    finally:
        blocks.release()
    agg = (br, bc) != (1, 1)
    if neighbors or base is not None:
        kind = "neighbors" if neighbors else color
        with np.errstate(invalid="ignore", divide="ignore"):
            data = np.where(kept_sum > 0, total / kept_sum, np.nan)
        kind = "mean " + kind if agg else kind
    elif agg:
        data, kind = kept_sum / block_sizes(rows, cols, br, bc), "fraction"
    else:
        data, kind = np.where(kept_sum > 0, 1.0, np.nan), "mask"
    return MatrixImage(data, kind, (br, bc), (rows, cols), kept_total)


@contextmanager
def _session(diff, base=None):
    """(reader, base checkpoint or None), closing on exit only what was opened here."""
    reader = diff if isinstance(diff, DiffReader) else DiffReader(diff)
    ck = base
    try:
        if isinstance(base, (str, Path)):
            from ..io.checkpoint import Checkpoint

            ck = Checkpoint.open(base)
            differs = reader.check_base(ck, force=True)
            if differs:
                warnings.warn(f"{base} differs from the base this diff was made from "
                              f"({len(differs)} file(s)); colours may be wrong")
        yield reader, ck
    finally:
        if ck is not None and ck is not base:
            ck.close()
        if reader is not diff:
            reader.close()


def matrix_image(diff, tensor: str, *, base=None, color: str = "value",
                 max_pixels: int = 1024, block_elems: int = BLOCK_ELEMS) -> MatrixImage:
    """The matrix view of ``tensor`` in ``diff`` (a path or an open DiffReader).

    Without ``base``: the kept mask, or the kept fraction per block. With ``base`` (a path
    or an open Checkpoint): the kept fine-tuned values (``color="value"``) or their change
    from the base (``"change"``), or their mean per block. Rows are read in blocks of about
    ``block_elems`` positions. Cost O(rows * cols) time, O(block_elems + image) memory.
    """
    _check_options(color, max_pixels, block_elems)
    with _session(diff, base) as (reader, ck):
        return _image(reader, tensor, base=ck, color=color, max_pixels=max_pixels,
                      block_elems=block_elems)


def neighbor_image(diff, tensor: str, *, max_pixels: int = 1024,
                   block_elems: int = BLOCK_ELEMS) -> MatrixImage:
    """Kept-neighbour counts 0..4 per kept position (NaN at reset positions), or their
    mean over the kept positions of each block. Cost as :func:`matrix_image`."""
    _check_options("value", max_pixels, block_elems)
    with _session(diff) as (reader, _):
        return _image(reader, tensor, max_pixels=max_pixels, neighbors=True,
                      block_elems=block_elems)


def _check_options(color, max_pixels, block_elems=BLOCK_ELEMS):
    if color not in COLORS:
        raise KenstreamError(f"unknown colour mode {color!r}; use one of {', '.join(COLORS)}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise KenstreamError(f"max_pixels must be a positive integer, not {max_pixels!r}")
    if not isinstance(block_elems, int) or block_elems < 1:
        raise KenstreamError(f"block_elems must be a positive integer, not {block_elems!r}")
