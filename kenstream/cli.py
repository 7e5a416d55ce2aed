"""The ``kenstream`` command line: a thin ``main(argv) -> int`` over the public API.

Known failures print one line, ``error: ...``, and exit with the error's code (2 for bad
input, 1 for a failed verification); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from . import __version__
from .errors import KenstreamError, OutputError
from .settings import DEFAULT_TIES, DIFF_SHARD_SIZE, METHODS, MODEL_SHARD_SIZE, TIES


def _common(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or status lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kenstream",
        description="Prune a fine-tuned checkpoint against its base with KEN and store it as an "
                    "exact sparse diff, streaming tensor by tensor.")
    parser.add_argument("--version", action="version", version=f"kenstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="prune FINETUNED against BASE into a diff directory")
    p.add_argument("base", help="base checkpoint: directory, .safetensors/.bin file or org/name[@rev]")
    p.add_argument("finetuned", help="fine-tuned checkpoint, same forms as BASE")
    p.add_argument("-o", "--output", required=True, help="diff directory to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--k", type=int, help="grid points (kept values) per row")
    g.add_argument("--keep", type=float, help="fraction of each row to keep, e.g. 0.5")
    p.add_argument("--ties", choices=TIES, default=DEFAULT_TIES,
                   help="scrambled (default): exactly k per row, equal distances by a seeded "
                        "per-row order; positions: exactly k per row, equal distances to the "
                        "lowest column (the golden-vector rule, biased on bf16); values: also "
                        "keep every copy of a kept value")
    p.add_argument("--method", choices=METHODS, default="ken")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random and --ties scrambled")
    p.add_argument("--include", metavar="REGEX", help="select only tensors whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="store whole the tensors whose name matches")
    p.add_argument("-j", "--threads", type=int, default=None, help="selection threads")
    p.add_argument("--shard-size", default=DIFF_SHARD_SIZE,
                   help="maximum diff shard size (e.g. 500MB)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _common(p)

    p = sub.add_parser("rebuild", help="write base + diff as a model directory")
    p.add_argument("base")
    p.add_argument("diff")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--shard-size", default=MODEL_SHARD_SIZE)
    p.add_argument("--force", action="store_true", help="rebuild even if the base differs")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    _common(p)

    p = sub.add_parser("verify", help="check a diff's hashes, its base, and kept values")
    p.add_argument("diff")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", help="also compare every kept value with this fine-tune")
    p.add_argument("--force", action="store_true", help="verify even if the base differs")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("info", help="summarise a diff")
    p.add_argument("diff")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("demo", help="run compress, info, rebuild and verify on a built-in example")
    p.add_argument("directory", nargs="?", default="kenstream-demo",
                   help="where to put the example (default ./kenstream-demo)")
    p.add_argument("--keep", type=float, default=0.5)
    _common(p)

    from .viz.cli import add_parser as add_viz

    add_viz(sub, _common)
    return parser


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def print_info(report: dict) -> None:
    t = report["totals"]
    print(f"diff: {report['path']}")
    print(f"base: {report['base']}   fine-tune: {report['finetuned']}")
    sel = report["selection"]
    rule = f"k={sel['k']}" if sel.get("k") is not None else f"keep={sel.get('keep')}"
    print(f"selection: {sel['method']} {rule} ties={sel['ties']}")
    print(f"parameters: {t.get('params', 0):,}   selected: {t.get('selected', 0):,}   "
          f"kept: {t.get('kept', 0):,}   reset: {t.get('reset', 0):,} "
          f"({t['reset_percent']:.1f}% of selected)")
    print(f"diff bytes: {_human(t.get('diff_bytes', 0))}   fine-tune bytes: "
          f"{_human(t.get('finetuned_bytes', 0))}   ratio: {t['diff_to_finetuned']:.3f}")
    print(f"{'layer':>8} {'params':>14} {'kept %':>8} {'bytes':>12}")
    for layer, row in report["layers"].items():
        pct = 100.0 * row["kept"] / row["selected"] if row["selected"] else float("nan")
        print(f"{layer:>8} {row['params']:>14,} {pct:>8.1f} {_human(row['bytes']):>12}")


def _recorded(argv) -> list:
    """The command line to record in a diff: how to make it, so without --resume (which
    changes no byte of the result, and keeps a resumed diff identical to a whole run's)."""
    return [a for a in argv if a != "--resume"]


def _run(args, argv) -> int:
    import kenstream as ks

    if args.command == "compress":
        index = ks.compress(args.base, args.finetuned, args.output, k=args.k, keep=args.keep,
                            ties=args.ties, method=args.method, include=args.include,
                            exclude=args.exclude, seed=args.seed, threads=args.threads,
                            shard_size=args.shard_size, resume=args.resume,
                            overwrite=args.overwrite, quiet=args.quiet,
                            command=["kenstream"] + _recorded(argv))
        t = index["totals"]
        if not args.quiet:
            print(f"wrote {args.output}: kept {t['kept']:,} of {t['selected']:,} selected "
                  f"parameters, {_human(t['diff_bytes'])} "
                  f"({t['diff_bytes'] / max(t['finetuned_bytes'], 1):.1%} of the fine-tune)")
        return 0
    if args.command == "rebuild":
        index = ks.rebuild(args.base, args.diff, args.output, shard_size=args.shard_size,
                           force=args.force, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet)
        if not args.quiet:
            print(f"wrote {args.output}: {len(index['weight_map'])} tensors, "
                  f"{_human(index['metadata']['total_size'])}")
        return 0
    if args.command == "verify":
        try:
            report = ks.verify(args.diff, args.base, args.finetuned, force=args.force,
                               quiet=args.quiet)
        except KenstreamError as exc:
            if args.json and hasattr(exc, "report"):
                print(json.dumps(exc.report, indent=2))
            raise
        if args.json:
            print(json.dumps(report, indent=2))
        elif not args.quiet:
            if args.finetuned:
                print(f"{'tensor':<60} {'kept':>7} {'rel.err':>9}")
                for name, row in report["tensors"].items():
                    print(f"{name:<60} {row['kept_fraction']:>7.3f} "
                          f"{row.get('rel_error', float('nan')):>9.4f}")
            print("verify: OK")
        return 0
    if args.command == "info":
        report = ks.info(args.diff)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_info(report)
        return 0
    if args.command == "demo":
        from .example import run_demo

        return run_demo(args.directory, keep=args.keep, quiet=args.quiet)
    if args.command == "viz":
        from .viz.cli import run as run_viz

        return run_viz(args)
    raise AssertionError(args.command)  # argparse guarantees a known command


def _one_line(text: str) -> str:
    # Names and paths come from files; a newline in one must not split the error line.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = one_line_warning
        try:
            return _run(args, argv)
        except KenstreamError as exc:
            if debug:
                raise
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:
            if debug:
                raise
            # An OSError that no layer turned into a KenstreamError: still one line.
            err = OutputError.from_os(exc, "I/O", file=exc.filename)
            print(f"error: {_one_line(str(err))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted; rerun with --resume to continue", file=sys.stderr)
            return 130


def entry() -> None:
    sys.exit(main())
