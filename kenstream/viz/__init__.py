"""KENviz: pictures of what a diff kept, read from the diff (plus the base for changes).

Views: ``matrix`` (kept positions, optionally coloured by value or change from the base),
``neighbors`` (how many of each kept position's 4 neighbours are kept), ``layers`` (the
matrix view for every layer of a name template) and ``summary`` (kept fraction and diff
bytes per tensor and per layer). A tensor larger than the pixel budget on either side is
drawn in blocks: one pixel per ``br x bc`` positions, showing the block's kept fraction
(or mean value / change / neighbour count over its kept positions).

:mod:`.images` computes the arrays with NumPy, streaming row blocks; :mod:`.draw` draws
them with matplotlib; :mod:`.cli` is the ``kenstream viz`` subcommand. The names below
load lazily, so the command line's parser imports neither matplotlib nor the kernels.
"""

from __future__ import annotations

VIEWS = ("matrix", "neighbors", "layers", "summary")
COLORS = ("value", "change")

_LAZY = {name: "kenstream.viz.draw" for name in ("figure", "render", "to_rgba")}
_LAZY.update({name: "kenstream.viz.images" for name in (
    "BLOCK_ELEMS", "MatrixImage", "block_sizes", "block_sums", "layer_pattern", "layer_tensors",
    "matrix_image", "neighbor_counts", "neighbor_image", "pixel_blocks", "summary_table")})


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kenstream.viz' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY) + ["COLORS", "VIEWS"]
