"""Drawing the views of a diff with matplotlib (an optional extra, imported only here and
only when a figure is drawn). The arrays drawn come from :mod:`.images`."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..errors import KenstreamError
from ..io.jsonfile import write_bytes_atomic
from ..text import shortened
from . import VIEWS
from .images import (BLOCK_ELEMS, MatrixImage, _check_options, _image, _session, layer_pattern,
                     layer_tensors, matrix_image, neighbor_image, summary_table)

MISSING_MATPLOTLIB = "kenstream viz needs matplotlib: pip install 'kenstream[viz]'"

KEPT_COLOR = "#1f3b73"
NEIGHBOR_COLORS = ("#d62728", "#ff7f0e", "#bcbd22", "#2ca02c", "#1f77b4")
"""Colour of a kept position with 0, 1, 2, 3, 4 kept neighbours (reset positions: white)."""

STORED_COLORS = {"selected by the rule": KEPT_COLOR, "stored whole": "#ff7f0e",
                 "unchanged": "#9e9e9e"}
"""Bar colour of a tensor in the summary, by how the diff holds it (`how_stored`)."""


def how_stored(rec) -> str:
    """``rec``'s key in `STORED_COLORS`: pruned by the selection rule, stored whole (new,
    reshaped, excluded, non-float, quantized) or unchanged. The same in both formats,
    where the encoding says little (format 2 codes every stored tensor)."""
    if rec.encoding == "unchanged":
        return "unchanged"
    return "selected by the rule" if rec.selected else "stored whole"


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
    note = f"{shortened(template)}: {n} layers"
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
                colors = [STORED_COLORS[how_stored(records[n])] for n in table]
                ax.barh(np.arange(len(table)), vals / scale, color=colors)
                names = [shortened(n, 60) for n in table] if col == 0 else [""] * len(table)
                ax.set_yticks(np.arange(len(table)), names, fontsize=6.5)
                for tick in ax.get_yticklabels():
                    # Hundreds of small grey-smoothed names would triple the PNG's size.
                    tick.set_antialiased(False)
                ax.set_ylim(len(table) - 0.4, -0.6)
                ax.set_xlabel(label)
            ax.set_title(f"{what} per {per}", fontsize=9)
    from matplotlib.patches import Patch

    present = {how_stored(rec) for rec in records.values()} - {"unchanged"}  # no bar to see
    ax.legend(handles=[Patch(color=c, label=e) for e, c in STORED_COLORS.items()
                       if e in present], fontsize=7, loc="lower right", title="how stored",
              title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


# -- the public entry points -----------------------------------------------------------

def figure(diff, tensor, view, *, base=None, color="value", max_pixels=1024,
           block_elems=BLOCK_ELEMS):
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
            reader.check_hashes()  # every record is drawn: check them all, as rebuild does
            return summary_figure(reader.records, f"{shortened(reader.path)}: kept fraction "
                                                  "and size")
        if view == "layers":
            names = layer_tensors(reader.records, tensor)
            if not names:
                raise KenstreamError("no tensor of the diff matches this layer template",
                                     file=reader.path, tensor=tensor)
            budget = max(16, max_pixels // math.ceil(math.sqrt(len(names))))
            images = {n: _image(reader, name, base=ck, color=color, max_pixels=budget,
                                block_elems=block_elems)
                      for n, name in names.items()}
            return layers_figure(images, layer_pattern(tensor)[1])
        img = _image(reader, tensor, base=ck, color=color, max_pixels=max_pixels,
                     neighbors=view == "neighbors", block_elems=block_elems)
        rec = reader.records[tensor]
        kept = img.kept / max(1, img.shape[0] * img.shape[1])
        return matrix_figure(img, f"{shortened(tensor)}\n{list(rec.shape)}: {kept:.1%} kept "
                                  f"({rec.encoding})")


def render(diff, tensor, view, out, *, base=None, color="value", max_pixels=1024,
           raw=False, block_elems=BLOCK_ELEMS) -> Path:
    """Draw ``view`` of ``diff`` into ``out`` (format from its suffix) and return its Path.

    ``raw=True`` (matrix / neighbors only) writes just the image, one pixel per position
    or block, with no axes: the exact pixels :func:`to_rgba` gives. An ``out`` without a
    suffix gets ``.png`` added; the path returned is the file written.
    """
    mpl = _mpl()
    out = Path(out)
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    kinds = mpl.figure.Figure().canvas.get_supported_filetypes()
    kind = out.suffix[1:].lower()
    if kind not in kinds:
        raise KenstreamError(f"cannot write {out.suffix} pictures; use one of "
                             f".{', .'.join(sorted(kinds))}", file=out)
    picture = io.BytesIO()  # drawn here, then written at once (below)
    if raw:
        if view not in ("matrix", "neighbors"):
            raise KenstreamError("raw output exists only for the matrix and neighbors views")
        from matplotlib.image import imsave

        img = (neighbor_image(diff, tensor, max_pixels=max_pixels, block_elems=block_elems)
               if view == "neighbors" else
               matrix_image(diff, tensor, base=base, color=color, max_pixels=max_pixels,
                            block_elems=block_elems))
        imsave(picture, to_rgba(img), format=kind)
    else:
        fig = figure(diff, tensor, view, base=base, color=color, max_pixels=max_pixels,
                     block_elems=block_elems)
        fig.savefig(picture, dpi=100, format=kind)
    # Drawn in memory, then written through a temporary name: an interrupted run leaves no
    # half picture, and a link planted at ``out`` is replaced, not written through.
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, picture.getvalue())
    return out
