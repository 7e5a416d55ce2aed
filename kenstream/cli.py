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
from .reports import human, print_info, print_verify
from .format.spec import DEFAULT_LEVEL, FORMAT_VERSION, READ_VERSIONS
from .settings import DIFF_SHARD_SIZE, METHODS, MODEL_SHARD_SIZE, TIES


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

    p = sub.add_parser("compress", help="prune FINETUNED against BASE into a diff directory")
    p.add_argument("base", help="base checkpoint: directory, .safetensors/.bin file or org/name[@rev]")
    p.add_argument("finetuned", help="fine-tuned checkpoint, same forms as BASE")
    p.add_argument("-o", "--output", required=True, help="diff directory to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--k", type=int, help="grid points (kept values) per row")
    g.add_argument("--keep", type=float, help="fraction of each row to keep, e.g. 0.5")
    p.add_argument("--ties", choices=TIES, default="positions",
                   help="positions: exactly k per row; values: also keep duplicates of kept values")
    p.add_argument("--method", choices=METHODS, default="ken")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--include", metavar="REGEX", help="select only tensors whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="store whole the tensors whose name matches")
    p.add_argument("-j", "--threads", type=int, default=None, help="selection threads")
    p.add_argument("--shard-size", default=DIFF_SHARD_SIZE,
                   help="maximum diff shard size (e.g. 500MB)")
    p.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                   help="zstd level of the coded values and positions: higher is smaller and "
                        "slower (1 to 19)")
    p.add_argument("--format-version", type=int, choices=READ_VERSIONS, default=FORMAT_VERSION,
                   help="diff format to write; 1 only for kenstream 0.1 readers (raw values, "
                        "not entropy-coded)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _executor(p)
    _common(p)

    p = sub.add_parser("rebuild", help="write base + diff as a model directory")
    p.add_argument("base")
    p.add_argument("diff")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--shard-size", default=MODEL_SHARD_SIZE)
    p.add_argument("-j", "--threads", type=int, default=None,
                   help="blocks decoded at once (default: every core)")
    p.add_argument("--force", action="store_true", help="rebuild even if the base differs")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    _executor(p)
    _common(p)

    p = sub.add_parser("verify", help="check a diff's hashes, its base, and kept values")
    p.add_argument("diff")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", help="also compare every kept value with this fine-tune")
    p.add_argument("--force", action="store_true", help="verify even if the base differs")
    p.add_argument("--json", action="store_true")
    p.add_argument("-j", "--threads", type=int, default=None,
                   help="threads per task (default: every core)")
    _executor(p)
    _common(p)

    p = sub.add_parser("info", help="summarise a diff")
    p.add_argument("diff")
    p.add_argument("--tensors", action="store_true",
                   help="also list every tensor: kept share and bytes of positions and values")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    _common(p)

    p = sub.add_parser("demo", help="run compress, info, rebuild and verify on a built-in example")
    p.add_argument("directory", nargs="?", default="kenstream-demo",
                   help="where to put the example (default ./kenstream-demo)")
    p.add_argument("--keep", type=float, default=0.5)
    _common(p)

    from .viz.cli import add_parser as add_viz

    add_viz(sub, _common)
    return parser


# Options left out of the recorded command (name -> takes a value): they change no byte of
# the result, so a resumed or distributed diff stays identical to a local whole run's.
_UNRECORDED = {"--resume": False, "--executor": True, "--ray-address": True}


def _recorded(argv) -> list:
    """The command line to record in a diff: how to make it, so without where or in how
    many runs it was made (`_UNRECORDED`, also as ``--opt=value`` or an abbreviation)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        known = [o for o in _UNRECORDED if len(flag) > 2 and flag.startswith("--")
                 and o.startswith(flag)]
        if len(known) == 1:  # argparse has refused an ambiguous abbreviation already
            skip = _UNRECORDED[known[0]] and "=" not in arg
            continue
        out.append(arg)
    return out


def _run(args, argv) -> int:
    import kenstream as ks

    if args.command == "compress":
        index = ks.compress(args.base, args.finetuned, args.output, k=args.k, keep=args.keep,
                            ties=args.ties, method=args.method, include=args.include,
                            exclude=args.exclude, seed=args.seed, threads=args.threads,
                            shard_size=args.shard_size, level=args.level,
                            format_version=args.format_version, resume=args.resume,
                            overwrite=args.overwrite, quiet=args.quiet,
                            command=["kenstream"] + _recorded(argv), executor=args.executor,
                            ray_address=args.ray_address)
        t = index["totals"]
        if not args.quiet:
            print(f"wrote {args.output}: kept {t['kept']:,} of {t['selected']:,} selected "
                  f"parameters, {human(t['diff_bytes'])} "
                  f"({t['diff_bytes'] / max(t['finetuned_bytes'], 1):.1%} of the fine-tune)")
        return 0
    if args.command == "rebuild":
        index = ks.rebuild(args.base, args.diff, args.output, shard_size=args.shard_size,
                           force=args.force, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet, threads=args.threads, executor=args.executor,
                           ray_address=args.ray_address)
        if not args.quiet:
            print(f"wrote {args.output}: {len(index['weight_map'])} tensors, "
                  f"{human(index['metadata']['total_size'])}")
        return 0
    if args.command == "verify":
        try:
            report = ks.verify(args.diff, args.base, args.finetuned, force=args.force,
                               quiet=args.quiet, threads=args.threads, executor=args.executor,
                               ray_address=args.ray_address)
        except KenstreamError as exc:
            if args.json and hasattr(exc, "report"):
                print(json.dumps(exc.report, indent=2))
            raise
        if args.json:
            print(json.dumps(report, indent=2))
        elif not args.quiet:
            if args.finetuned:
                print_verify(report)
            print("verify: OK")
        return 0
    if args.command == "info":
        report = ks.info(args.diff)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_info(report, tensors=args.tensors)
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
