"""What the ``kenstream`` command line accepts: the argument parser, its option types and
help texts. Loads no kernel and no plotting library (``tests/test_layers.py``)."""

from __future__ import annotations

import argparse

from . import __version__
from .errors import SelectionError
from .format.spec import DEFAULT_LEVEL, FORMAT_VERSION, READ_VERSIONS
from .settings import (BUDGETS, DEFAULT_TIES, DIFF_SHARD_SIZE, METHODS, MODEL_SHARD_SIZE,
                       TIES, parse_keep)


class _Help(argparse.HelpFormatter):
    """Help that states every default: ``(default: X)`` after an option's text, unless the
    default is nothing (None, False) or the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


METHOD_HELP = ("ken (default): the KEN rule, k values a row matched to an even grid over the "
               "row's kernel density; delta: the k largest changes |ft - base| a row; "
               "magnitude: the k largest |ft| a row; random: k seeded random positions a "
               "row (delta, magnitude and random are baselines)")


BUDGET_HELP = ("how the keep is shared: row (default): every row keeps its k; tensor: a "
               "tensor's total (keep x its values) goes to its highest scores, whatever the "
               "row; global: the total of every selected tensor goes to the highest scores "
               "of all of them, each tensor's scores divided by their root mean square "
               "(delta, magnitude and random only; format 2; costs one more read of the "
               "selected tensors)")


def _keep(text) -> float:
    """``--keep``: a fraction (0.25) or a percentage (25%)."""
    try:
        return parse_keep(text)
    except SelectionError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction such as 0.25 or 25%") \
            from None


def _threads(text) -> int:
    """``-j``: a thread count of at least 1 (more than the cores numba sees runs on them all)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count of 1 or more")
    return n


_DIRECT_OFF = "set KENSTREAM_DIRECT_IO=0 to read through the page cache instead."
_COMPRESS_NOTE = ("Blocks of the inputs that the page cache does not hold are read past it "
                  "(O_DIRECT) where the system allows it; " + _DIRECT_OFF)
_REBUILD_NOTE = ("When base and model together exceed memory, the base is read past the page "
                 "cache (O_DIRECT) where the system allows it; " + _DIRECT_OFF)


def _common(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or status lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _executor(p):
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run the work here, or as Ray tasks on a cluster (byte-identical; "
                        "needs kenstream[ray])")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join (default: the running one, or a new local one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kenstream",
        description="Prune a fine-tuned checkpoint against its base with KEN and store it as an "
                    "exact sparse diff, streaming tensor by tensor.")
    parser.add_argument("--version", action="version", version=f"kenstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plain_add = sub.add_parser

    def add_parser(name, **kw):
        kw.setdefault("formatter_class", _Help)
        return plain_add(name, **kw)

    sub.add_parser = add_parser

    p = sub.add_parser("compress", help="prune FINETUNED against BASE into a diff directory",
                       epilog=_COMPRESS_NOTE)
    p.add_argument("base", help="base checkpoint: directory, .safetensors/.bin file or org/name[@rev]")
    p.add_argument("finetuned", help="fine-tuned checkpoint, same forms as BASE")
    p.add_argument("-o", "--output", required=True, help="diff directory to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--k", type=int, help="grid points (kept values) per row")
    g.add_argument("--keep", type=_keep, help="share of each row to keep: 0.25 or 25%%")
    g.add_argument("--size", metavar="BYTES|N%",
                   help="the diff's size instead: 300MB, 1.5G, or 10%% of the fine-tune's "
                        "bytes; kenstream compresses, measures and corrects the keep until "
                        "the diff is within 98-100%% of it (usually 2 or 3 passes, at most 9; "
                        "where short rows make the size move in steps, the largest step under "
                        "it) and prints the keep it chose")
    p.add_argument("--ties", choices=TIES, default=DEFAULT_TIES,
                   help="scrambled (default): exactly k per row, equal distances by a "
                        "seeded per-row order (delta and magnitude: equal scores from a "
                        "seeded column on); positions: exactly k per row, equal distances to "
                        "the lowest column (the golden-vector rule, biased on bf16); values: "
                        "also keep every copy of a kept value. Under --budget tensor|global "
                        "they choose among the positions of the score bin where the count "
                        "is met: spread evenly over tensors and rows (scrambled), the first "
                        "in plan order (positions), all of them (values)")
    p.add_argument("--method", choices=METHODS, default="ken", help=METHOD_HELP)
    p.add_argument("--budget", choices=BUDGETS, default="row", help=BUDGET_HELP)
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --method random and --ties scrambled (0 to 2**64 - 1)")
    p.add_argument("--include", metavar="REGEX",
                   help="select only tensors whose name matches; the others are stored whole "
                        "where they changed")
    p.add_argument("--exclude", metavar="REGEX", help="store whole the tensors whose name matches")
    p.add_argument("-j", "--threads", type=_threads, default=None,
                   help="selection threads (default: every core)")
    p.add_argument("--shard-size", default=DIFF_SHARD_SIZE,
                   help="maximum diff shard size (e.g. 500MB); a tensor larger than it "
                        "gets a shard of its own")
    p.add_argument("--level", type=int, default=None,
                   help="zstd level of format 2's coded values and positions: higher is "
                        f"smaller and slower (1 to 19; default: {DEFAULT_LEVEL})")
    p.add_argument("--format-version", type=int, choices=READ_VERSIONS, default=FORMAT_VERSION,
                   help="diff format to write; 1 only for kenstream 0.1 readers (raw values, "
                        "not entropy-coded)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--strict-resume", action="store_true",
                   help="record full sha256 hashes of the inputs, so that --resume refuses "
                        "inputs changed anywhere (costs one extra read of the inputs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by kenstream")
    _executor(p)
    _common(p)

    p = sub.add_parser("rebuild", help="write base + diff as a model directory",
                       epilog=_REBUILD_NOTE)
    p.add_argument("base", help="the base the diff was made against (same forms as for "
                                "compress)")
    p.add_argument("diff", help="diff directory written by compress")
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    p.add_argument("--shard-size", default=MODEL_SHARD_SIZE,
                   help="maximum shard size of the rebuilt model (e.g. 5GB, 500M); a "
                        "tensor larger than it gets a shard of its own")
    p.add_argument("-j", "--threads", type=_threads, default=None,
                   help="blocks decoded at once (default: every core)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if the base's files differ from the recorded ones (only "
                        "needed for diffs without base digests: format 1, or made before "
                        "kenstream recorded them; a base of other content is refused anyway)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted rebuild, keeping the shards already written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by kenstream")
    _executor(p)
    _common(p)

    p = sub.add_parser("verify", help="check a diff's hashes, its base, and kept values",
                       usage="%(prog)s [options] BASE DIFF  (or: %(prog)s [options] DIFF "
                             "--base BASE)")
    p.add_argument("paths", nargs="+", metavar="BASE DIFF",
                   help="the base the diff was made against (same forms as for compress), "
                        "then the diff directory to check; as for rebuild")
    p.add_argument("--base", help="the base, given as an option instead (then only DIFF "
                                  "comes as an argument)")
    p.set_defaults(usage_error=p.error)
    p.add_argument("--finetuned", help="also compare every kept value with this fine-tune")
    p.add_argument("--force", action="store_true",
                   help="verify even if the base's files differ from the recorded ones (as "
                        "rebuild --force)")
    p.add_argument("-j", "--threads", type=_threads, default=None,
                   help="blocks checked at once (default: every core)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    _executor(p)
    _common(p)

    p = sub.add_parser("info", help="summarise a diff")
    p.add_argument("diff", help="diff directory to summarise")
    p.add_argument("--tensors", action="store_true",
                   help="also list every tensor: kept share and bytes of positions and values")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    _common(p)

    p = sub.add_parser("demo", help="run compress, info, rebuild and verify on a built-in example")
    p.add_argument("directory", nargs="?", default="kenstream-demo",
                   help="where to put the example (default ./kenstream-demo)")
    p.add_argument("--keep", type=_keep, default=0.5, help="share of each row to keep")
    _common(p)

    from .viz.cli import add_parser as add_viz

    add_viz(sub, _common)
    return parser
