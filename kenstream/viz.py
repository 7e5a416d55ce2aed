"""KENviz: pictures of what a diff kept, read from the diff alone (plus the base for changes).

Views: ``matrix`` (kept positions, optionally coloured by value or change from the base),
``neighbors`` (how many of each kept position's 4 neighbours are kept), ``layers`` (the
matrix view for every layer of a name template) and ``summary`` (kept fraction and diff
bytes per tensor and per layer). A tensor larger than the pixel budget on either side is
drawn in blocks: one pixel per ``br x bc`` positions, showing the block's kept fraction
(or mean value / change / neighbour count over its kept positions).

Images are computed by streaming row blocks through :func:`kenstream.format.kept_rows`, so
memory stays near ``_CHUNK_ELEMS`` booleans whatever the tensor size. matplotlib is an
optional extra and is imported only when a figure is drawn.
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

from . import dtypes
from .diff import DiffReader
from .errors import KenstreamError
from .format import kept_rows

VIEWS = ("matrix", "neighbors", "layers", "summary")
COLORS = ("value", "change")
MISSING_MATPLOTLIB = "kenstream viz needs matplotlib: pip install 'kenstream[viz]'"

KEPT_COLOR = "#1f3b73"
NEIGHBOR_COLORS = ("#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#1f77b4")
"""Colour of a kept position with 0, 1, 2, 3, 4 kept neighbours (reset positions: white)."""

# Rows are streamed in blocks of about this many positions (4 M booleans, 16 MB as float32).
_CHUNK_ELEMS = 1 << 22
_LAYER = re.compile(r"\.(\d+)\.")
_ENCODING_COLORS = {"bitmask": KEPT_COLOR, "indices": "#6a8fd0", "dense": "#ff7f0e",
                    "unchanged": "#9e9e9e"}


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
        if m is not None:
            found.setdefault(int(m.group(1)), name)
    return dict(sorted(found.items()))


def layer_of(name: str) -> str:
    """The first ``.N.`` number in ``name``, else ``"other"``."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def summary_table(records: dict) -> tuple:
    """Per tensor and per layer: params, kept, kept fraction and diff bytes.

    Returns (tensors, layers): two dicts name -> {"params", "kept", "fraction", "bytes"};
    layers are in numeric order with "other" last.
    """
    tensors, layers = {}, {}
    for name, rec in records.items():
        params = int(rec["rows"]) * int(rec["cols"])
        row = {"params": params, "kept": int(rec["kept"]), "bytes": int(rec.get("nbytes") or 0)}
        tensors[name] = dict(row, fraction=row["kept"] / params if params else 0.0)
        acc = layers.setdefault(layer_of(name), {"params": 0, "kept": 0, "bytes": 0})
        for key in acc:
            acc[key] += row[key]
    order = sorted(layers, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    layers = {k: dict(layers[k], fraction=layers[k]["kept"] / layers[k]["params"]
                      if layers[k]["params"] else 0.0) for k in order}
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
        close = difflib.get_close_matches(tensor, list(reader.records), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "kenstream info DIFF lists the tensors"
        raise KenstreamError("no such tensor in the diff", file=reader.path, tensor=tensor,
                             hint=hint)
    return rec


def _row_blocks(rows: int, cols: int, br: int):
    step = max(br, (_CHUNK_ELEMS // max(cols, 1)) // br * br)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _base_rows(base, rec, tensor):
    """The base tensor as [rows, cols] storage, and its dtype code, for change colouring."""
    name = rec.get("base_name")
    if name is None:
        raise KenstreamError("is new in the fine-tune; it has no base values to compare",
                             tensor=tensor, hint="use --color value")
    info = base.info(name)
    rows, cols = int(rec["rows"]), int(rec["cols"])
    if math.prod(info.shape) != rows * cols:
        raise KenstreamError(f"base tensor {name!r} has shape {list(info.shape)}, the diff "
                             f"{rec['shape']}", tensor=tensor)
    return base.array(name).reshape(rows, cols), info.dtype


def _image(reader, tensor, *, base=None, color="value", max_pixels=1024, neighbors=False):
    """MatrixImage of one tensor, streamed over row blocks (see :func:`matrix_image`)."""
    rec = _record(reader, tensor)
    if color == "change" and base is None and not neighbors:
        raise KenstreamError("colouring by change needs the base", tensor=tensor,
                             hint="pass --base BASE")
    rows, cols = int(rec["rows"]), int(rec["cols"])
    if rows * cols == 0:
        raise KenstreamError("has no elements; there is nothing to draw", tensor=tensor)
    br, bc = pixel_blocks(rows, cols, max_pixels)
    entries = reader.entries(tensor)
    values = entries["values"].reshape(-1) if "values" in entries else None
    base_rows = _base_rows(base, rec, tensor) if base is not None and color == "change" else None
    kept_sum = np.zeros((-(-rows // br), -(-cols // bc)))
    total = np.zeros_like(kept_sum)
    start = 0
    try:
        for r0, r1 in _row_blocks(rows, cols, br):
            if neighbors:
                # One row of overlap above and below, so counts at block seams are exact.
                top = 1 if r0 > 0 else 0
                ext = kept_rows(rec, entries, r0 - 1, r1 + 1)
                mask = ext[top:top + r1 - r0]
                weight = _kept_neighbors(ext)[top:top + r1 - r0] * mask.view(np.uint8)
            else:
                mask = kept_rows(rec, entries, r0, r1)
            n = int(np.count_nonzero(mask))
            if base is not None and not neighbors:
                weight = np.zeros(mask.shape, np.float32)
                if n:
                    weight[mask] = _as_f32(values[start:start + n], rec["dtype"])
                if base_rows is not None:
                    # Whole-block arithmetic: cheaper than gathering base values at the mask.
                    weight -= np.where(mask, _as_f32(base_rows[0][r0:r1], base_rows[1]), 0)
            p0 = r0 // br
            kept_sum[p0:p0 + -(-(r1 - r0) // br)] = block_sums(mask, br, bc)
            if neighbors or base is not None:
                total[p0:p0 + -(-(r1 - r0) // br)] = block_sums(weight, br, bc)
            start += n
    finally:
        reader.release(tensor)
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
    return MatrixImage(data, kind, (br, bc), (rows, cols), start)


@contextmanager
def _session(diff, base=None):
    """(reader, base checkpoint or None), closing on exit only what was opened here."""
    reader = diff if isinstance(diff, DiffReader) else DiffReader(diff)
    ck = base
    try:
        if isinstance(base, (str, Path)):
            from .io.checkpoint import Checkpoint

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
                 max_pixels: int = 1024) -> MatrixImage:
    """The matrix view of ``tensor`` in ``diff`` (a path or an open DiffReader).

    Without ``base``: the kept mask, or the kept fraction per block. With ``base`` (a path
    or an open Checkpoint): the kept fine-tuned values (``color="value"``) or their change
    from the base (``"change"``), or their mean per block. Cost O(rows * cols) time,
    O(_CHUNK_ELEMS + image) memory.
    """
    _check_options(color, max_pixels)
    with _session(diff, base) as (reader, ck):
        return _image(reader, tensor, base=ck, color=color, max_pixels=max_pixels)


def neighbor_image(diff, tensor: str, *, max_pixels: int = 1024) -> MatrixImage:
    """Kept-neighbour counts 0..4 per kept position (NaN at reset positions), or their
    mean over the kept positions of each block. Cost as :func:`matrix_image`."""
    _check_options("value", max_pixels)
    with _session(diff) as (reader, _):
        return _image(reader, tensor, max_pixels=max_pixels, neighbors=True)


def _check_options(color, max_pixels):
    if color not in COLORS:
        raise KenstreamError(f"unknown colour mode {color!r}; use one of {', '.join(COLORS)}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise KenstreamError(f"max_pixels must be a positive integer, not {max_pixels!r}")


# -- figures (matplotlib imported lazily) -----------------------------------------------

def _mpl():
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401  (loads the Figure class)
    except ImportError:
        raise KenstreamError(MISSING_MATPLOTLIB) from None
    return matplotlib


def style(img: MatrixImage, vlim=None):
    """(cmap, norm, label) that draw ``img``; NaN renders white. ``vlim`` overrides limits."""
    mpl = _mpl()
    from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize

    kind = img.kind
    if kind == "mask":
        return ListedColormap([KEPT_COLOR]).with_extremes(bad="white"), Normalize(0, 1), None
    if kind == "neighbors":
        cmap = ListedColormap(NEIGHBOR_COLORS).with_extremes(bad="white")
        return cmap, BoundaryNorm(np.arange(-0.5, 5), 5), "kept neighbours"
    if kind == "fraction":
        return mpl.colormaps["Blues"].with_extremes(bad="white"), Normalize(0, 1), \
            "kept fraction per block"
    if kind == "mean neighbors":
        return mpl.colormaps["viridis"].with_extremes(bad="white"), Normalize(0, 4), \
            "mean kept neighbours of kept positions"
    lo, hi = vlim if vlim is not None else _limits(img.data, kind)
    name = "coolwarm" if kind.endswith("change") else "viridis"
    label = ("fine-tuned - base" if kind.endswith("change") else "fine-tuned value")
    if img.aggregated:
        label = f"mean {label} of kept positions"
    return mpl.colormaps[name].with_extremes(bad="white"), Normalize(lo, hi), label


def _limits(data, kind):
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return -1.0, 1.0
    # Percentiles, not extremes: a few outliers would otherwise wash every colour out.
    if kind.endswith("change"):
        m = float(np.percentile(np.abs(finite), 99)) or 1.0
        return -m, m
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    return (lo, hi) if hi > lo else (lo - 1, hi + 1)


def to_rgba(img: MatrixImage) -> np.ndarray:
    """float [H, W, 4] colours of ``img`` exactly as the figures colour it."""
    cmap, norm, _ = style(img)
    return cmap(norm(np.ma.masked_invalid(img.data)))


def _legend(ax, img):
    from matplotlib.patches import Patch

    if img.kind == "mask":
        handles = [Patch(color=KEPT_COLOR, label="kept"),
                   Patch(facecolor="white", edgecolor="0.5", label="reset to base")]
    else:
        handles = [Patch(color=c, label=f"{i} kept neighbours")
                   for i, c in enumerate(NEIGHBOR_COLORS)]
        handles.append(Patch(facecolor="white", edgecolor="0.5", label="reset"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
              frameon=False)


def _draw(fig, ax, img, vlim=None, key=True):
    cmap, norm, label = style(img, vlim)
    rows, cols = img.shape
    shown = ax.imshow(np.ma.masked_invalid(img.data), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest", extent=(0, cols, rows, 0))
    if key and img.kind in ("mask", "neighbors"):
        _legend(ax, img)
    elif key:
        clipped = img.kind.endswith(("value", "change"))  # limits are percentiles
        fig.colorbar(shown, ax=ax, label=label, shrink=0.9, extend="both" if clipped else "neither")
    return shown


def _figsize(h, w, extra_w=2.4):
    # Axes keep the image's aspect with the long side 4..10 inches (1 pixel per position
    # up to 1000 at dpi 100); very thin images get a minimum width / height instead.
    s = min(max(max(h, w), 400), 1000) / max(h, w) / 100
    return max(w * s, 2.5) + extra_w, max(h * s, 1.2) + 1.3


def matrix_figure(img: MatrixImage, title: str):
    """A Figure of one matrix or neighbours image with axes in positions, a key and the scale."""
    Figure = _mpl().figure.Figure
    fig = Figure(figsize=_figsize(*img.data.shape), layout="constrained")
    ax = fig.add_subplot()
    _draw(fig, ax, img)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("row")
    xlabel = "column"
    if img.aggregated:
        xlabel += "\n" + img.scale
    ax.set_xlabel(xlabel, fontsize=8)
    return fig


def layers_figure(images: dict, template: str):
    """A grid (about square) of matrix panels, one per layer, titled ``layer N``."""
    Figure = _mpl().figure.Figure
    n = len(images)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.6 * ncols + 1.8, 2.3 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    first = next(iter(images.values()))
    vlim = None
    if first.kind.endswith(("value", "change")):
        stacked = np.concatenate([im.data.ravel() for im in images.values()])
        vlim = _limits(stacked, first.kind)
    shown = None
    for ax, (layer, img) in zip(axes, images.items()):
        shown = _draw(fig, ax, img, vlim, key=False)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[n:]:
        fig.delaxes(ax)
    if first.kind == "mask":
        _legend(axes[n - 1], first)
    else:
        fig.colorbar(shown, ax=list(axes[:n]), label=style(first, vlim)[2], shrink=0.8,
                     extend="both" if vlim else "neither")
    note = f"{template}: {n} layers"
    if any(im.aggregated for im in images.values()):
        note += f"; {first.scale}"
    fig.suptitle(note, fontsize=9)
    return fig


def _unit(nbytes):
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= scale:
            return scale, unit
    return 1.0, "B"


def summary_figure(records: dict, title: str = ""):
    """Bar charts of kept fraction and diff bytes per layer (top) and per tensor (bottom)."""
    Figure = _mpl().figure.Figure
    tensors, layers = summary_table(records)
    height = min(1.2 + 0.12 * len(tensors), 80)
    fig = Figure(figsize=(10, 2.8 + height), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(2.8, height))
    for col, (key, what) in enumerate((("fraction", "kept fraction"), ("bytes", "diff bytes"))):
        for row, (table, per) in enumerate(((layers, "layer"), (tensors, "tensor"))):
            ax = fig.add_subplot(grid[row, col])
            vals = np.array([t[key] for t in table.values()], dtype=float)
            scale, unit = _unit(vals.max() if key == "bytes" and vals.size else 0)
            label = what if key == "fraction" else f"{what} ({unit})"
            if per == "layer":
                ax.bar(list(table), vals / scale, color=KEPT_COLOR)
                ax.set_xlabel("layer")
                ax.set_ylabel(label)
            else:
                colors = [_ENCODING_COLORS[records[n]["encoding"]] for n in table]
                ax.barh(np.arange(len(table)), vals / scale, color=colors)
                ax.set_yticks(np.arange(len(table)),
                              list(table) if col == 0 else [""] * len(table), fontsize=6.5)
                for tick in ax.get_yticklabels():
                    # Hundreds of small grey-smoothed names would triple the PNG's size.
                    tick.set_antialiased(False)
                ax.set_ylim(len(table) - 0.4, -0.6)
                ax.set_xlabel(label)
            ax.set_title(f"{what} per {per}", fontsize=9)
    from matplotlib.patches import Patch

    present = {rec["encoding"] for rec in records.values()} - {"unchanged"}  # no bar to see
    ax.legend(handles=[Patch(color=c, label=e) for e, c in _ENCODING_COLORS.items()
                       if e in present], fontsize=7, loc="lower right", title="encoding",
              title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


# -- the public entry points -----------------------------------------------------------

def figure(diff, tensor, view, *, base=None, color="value", max_pixels=1024):
    """The matplotlib Figure of ``view`` (see :data:`VIEWS`) for ``tensor`` of ``diff``.

    ``tensor`` is unused by ``summary``; for ``layers`` it is a template with ``{n}`` or one
    layer's name. Raises KenstreamError for an unknown view or tensor, a missing matplotlib,
    or a base that does not fit.
    """
    _mpl()
    if view not in VIEWS:
        raise KenstreamError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
    _check_options(color, max_pixels)
    with _session(diff, base if view in ("matrix", "layers") else None) as (reader, ck):
        if view == "summary":
            return summary_figure(reader.records, f"{reader.path}: kept fraction and size")
        if view == "layers":
            names = layer_tensors(reader.records, tensor)
            if not names:
                raise KenstreamError("no tensor of the diff matches this layer template",
                                     file=reader.path, tensor=tensor)
            budget = max(16, max_pixels // math.ceil(math.sqrt(len(names))))
            images = {n: _image(reader, name, base=ck, color=color, max_pixels=budget)
                      for n, name in names.items()}
            return layers_figure(images, layer_pattern(tensor)[1])
        img = _image(reader, tensor, base=ck, color=color, max_pixels=max_pixels,
                     neighbors=view == "neighbors")
        rec = reader.records[tensor]
        kept = img.kept / max(1, img.shape[0] * img.shape[1])
        return matrix_figure(img, f"{tensor}\n{list(rec['shape'])}: {kept:.1%} kept "
                                  f"({rec['encoding']})")


def render(diff, tensor, view, out, *, base=None, color="value", max_pixels=1024,
           raw=False) -> Path:
    """Draw ``view`` of ``diff`` into ``out`` (format from its suffix) and return its Path.

    ``raw=True`` (matrix / neighbors only) writes just the image, one pixel per position
    or block, with no axes: the exact pixels :func:`to_rgba` gives.
    """
    mpl = _mpl()
    out = Path(out)
    kinds = mpl.figure.Figure().canvas.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in kinds:
        raise KenstreamError(f"cannot write {out.suffix} pictures; use one of "
                             f".{', .'.join(sorted(kinds))}", file=out)
    if raw:
        if view not in ("matrix", "neighbors"):
            raise KenstreamError("raw output exists only for the matrix and neighbors views")
        from matplotlib.image import imsave

        img = (neighbor_image(diff, tensor, max_pixels=max_pixels) if view == "neighbors" else
               matrix_image(diff, tensor, base=base, color=color, max_pixels=max_pixels))
        out.parent.mkdir(parents=True, exist_ok=True)
        imsave(out, to_rgba(img))
        return out
    fig = figure(diff, tensor, view, base=base, color=color, max_pixels=max_pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
