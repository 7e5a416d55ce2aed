"""The ``kenstream viz`` subcommand: argument parsing only; the drawing is in :mod:`.draw`.

Building the parser (e.g. for ``--help``) imports neither matplotlib nor the diff reader.
"""

from __future__ import annotations

from ..text import printable
from . import COLORS, VIEWS


def add_parser(sub, common):
    """Register ``viz`` on the argparse subparsers ``sub``; ``common(p)`` adds --quiet/--debug."""
    p = sub.add_parser(
        "viz", help="draw which positions a diff kept (needs kenstream[viz])",
        description="Draw a picture of a diff: the kept positions of one tensor (matrix), how "
                    "many neighbours each kept position has (neighbors), one tensor across "
                    "all layers (layers), or kept fraction and bytes of every tensor (summary).")
    p.add_argument("diff", help="diff directory written by kenstream compress")
    p.add_argument("--tensor", metavar="NAME",
                   help="tensor to draw; for --view layers a name with {n} for the layer "
                        "number, or any one layer's name (not needed for summary)")
    p.add_argument("--view", choices=VIEWS, default="matrix",
                   help="matrix: the kept positions of one tensor; neighbors: how many kept "
                        "neighbours each kept position has; layers: one tensor across the "
                        "layers; summary: kept share and bytes of every tensor")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png",
                   help="picture to write (.png, .svg or .pdf)")
    p.add_argument("--base", help="base checkpoint: colour kept values by --color")
    p.add_argument("--color", choices=COLORS, default="value",
                   help="with --base: the fine-tuned value, or its change from the base")
    p.add_argument("--max-pixels", type=int, default=1024, metavar="N",
                   help="pixels per side before positions are drawn in blocks")
    p.add_argument("--raw", action="store_true",
                   help="matrix/neighbors: write only the image, one pixel per (block of) "
                        "position(s), no axes")
    common(p)
    return p


def run(args) -> int:
    from .draw import render

    out = render(args.diff, args.tensor, args.view, args.output, base=args.base,
                 color=args.color, max_pixels=args.max_pixels, raw=args.raw)
    if not args.quiet:
        print(f"wrote {printable(out)}")
    return 0
