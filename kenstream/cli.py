"""The ``kenstream`` command line: a thin ``main(argv) -> int`` over the public API.

Known failures print one line, ``error: ...``, and exit with the error's code (2 for bad
input, 1 for a failed verification); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from . import __version__
from .errors import KenstreamError, OutputError, SelectionError
from .reports import human, print_info, print_verify
from .format.spec import DEFAULT_LEVEL, FORMAT_VERSION, READ_VERSIONS
from .settings import (BUDGETS, DEFAULT_TIES, DIFF_SHARD_SIZE, METHODS, MODEL_SHARD_SIZE,
                       TIES, parse_keep)
from .text import printable


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
                   help="scrambled (default): exactly k per row, equal distances by a seeded "
                        "per-row order; positions: exactly k per row, equal distances to the "
                        "lowest column (the golden-vector rule, biased on bf16); values: also "
                        "keep every copy of a kept value")
    p.add_argument("--method", choices=METHODS, default="ken", help=METHOD_HELP)
    p.add_argument("--budget", choices=BUDGETS, default="row", help=BUDGET_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed for --method random and --ties scrambled")
    p.add_argument("--include", metavar="REGEX", help="select only tensors whose name matches")
    p.add_argument("--exclude", metavar="REGEX", help="store whole the tensors whose name matches")
    p.add_argument("-j", "--threads", type=_threads, default=None,
                   help="selection threads (default: every core)")
    p.add_argument("--shard-size", default=DIFF_SHARD_SIZE,
                   help="maximum diff shard size (e.g. 500MB); a tensor larger than it "
                        "gets a shard of its own")
    p.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                   help="zstd level of the coded values and positions: higher is smaller and "
                        "slower (1 to 19)")
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
    p.add_argument("--force", action="store_true", help="rebuild even if the base differs")
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
    p.add_argument("--force", action="store_true", help="verify even if the base differs")
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


# Options left out of the recorded command (name -> takes a value): they change no byte of
# the result, so a resumed or distributed diff stays identical to a local whole run's.
_UNRECORDED = {"--resume": False, "--strict-resume": False, "--executor": True,
               "--ray-address": True, "--threads": True, "--quiet": False, "--debug": False}
"""Options that change no byte of the output (flag -> whether it takes a value)."""
_UNRECORDED_SHORT = {"-j": True, "-q": False}
_SHORT_VALUE = set("jo")  # compress's short options that take a value; -q and -h take none


def _unbundled(argv) -> list:
    """``argv`` with bundled short options split as argparse reads them: ``-qj2`` ->
    ``-q -j 2``, ``-qo DIR`` -> ``-q -o DIR``. Anything else (``-3``, ``--x``) as it is."""
    out = []
    for arg in argv:
        body = arg[1:]
        if arg.startswith("--") or len(arg) <= 2 or not arg.startswith("-") \
                or body[0] not in _SHORT_VALUE | {"q", "h"}:
            out.append(arg)
            continue
        for i, c in enumerate(body):
            if c not in _SHORT_VALUE | {"q", "h"}:  # not a bundle argparse would accept
                out.append("-" + body[i:])
                break
            out.append("-" + c)
            if c in _SHORT_VALUE:
                if body[i + 1:]:
                    out.append(body[i + 1:])
                break
    return out


def _recorded(argv) -> list:
    """The command line to record in a diff: how to make it, so without where, on how many
    threads or in how many runs it was made, or what it printed (`_UNRECORDED`, also as
    ``--opt=value``, an abbreviation, ``-j 2``, ``-j2`` or in a bundle such as ``-qj2``)."""
    out, skip = [], False
    for arg in _unbundled(argv):
        if skip:
            skip = False
            continue
        short = arg[:2]
        if short in _UNRECORDED_SHORT and not arg.startswith("--"):
            skip = _UNRECORDED_SHORT[short] and len(arg) == 2
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
        options = dict(ties=args.ties, method=args.method, include=args.include,
                       exclude=args.exclude, seed=args.seed, threads=args.threads,
                       shard_size=args.shard_size, level=args.level,
                       format_version=args.format_version, resume=args.resume,
                       strict_resume=args.strict_resume, overwrite=args.overwrite,
                       quiet=args.quiet, command=["kenstream"] + _recorded(argv),
                       executor=args.executor, ray_address=args.ray_address,
                       budget=args.budget)
        if args.size is not None:
            index = ks.compress_to_size(args.base, args.finetuned, args.output, args.size,
                                        **options)
            _print_size(index)
        else:
            index = ks.compress(args.base, args.finetuned, args.output, k=args.k,
                                keep=args.keep, **options)
        t = index["totals"]
        if not args.quiet:
            print(f"wrote {printable(args.output)}: kept {t['kept']:,} of {t['selected']:,} "
                  f"selected parameters, {human(t['diff_bytes'])} "
                  f"({t['diff_bytes'] / max(t['finetuned_bytes'], 1):.1%} of the fine-tune)")
        return 0
    if args.command == "rebuild":
        index = ks.rebuild(args.base, args.diff, args.output, shard_size=args.shard_size,
                           force=args.force, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet, threads=args.threads, executor=args.executor,
                           ray_address=args.ray_address)
        if not args.quiet:
            print(f"wrote {printable(args.output)}: {len(index['weight_map'])} tensors, "
                  f"{human(index['metadata']['total_size'])}")
        return 0
    if args.command == "verify":
        try:
            report = ks.verify(args.diff, args.base, args.finetuned, force=args.force,
                               quiet=args.quiet, threads=args.threads, executor=args.executor,
                               ray_address=args.ray_address)
        except KenstreamError as exc:
            if args.json and hasattr(exc, "report"):
                print(json.dumps(exc.report, indent=2, allow_nan=False))
            raise
        if args.json:
            print(json.dumps(report, indent=2, allow_nan=False))
        elif not args.quiet:
            if args.finetuned:
                print_verify(report)
            print("verify: OK")
        return 0
    if args.command == "info":
        report = ks.info(args.diff)
        if args.json:
            print(json.dumps(report, indent=2, allow_nan=False))
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


def _verify_paths(args) -> None:
    """``args.base`` and ``args.diff`` from ``verify BASE DIFF`` or ``verify DIFF --base
    BASE``; any other count is a usage error (exit 2)."""
    paths = args.paths
    if args.base is None and len(paths) == 2:
        args.base, args.diff = paths
    elif args.base is not None and len(paths) == 1:
        args.diff = paths[0]
    elif args.base is None and len(paths) == 1:
        args.usage_error("the base is missing: kenstream verify BASE DIFF (or DIFF --base BASE)")
    else:
        args.usage_error(f"expected BASE DIFF, or DIFF with --base; got {len(paths)} paths"
                         + (" and --base" if args.base is not None else ""))


def _print_size(index) -> None:
    """What --size chose (on stdout even with -q: it is the result asked for)."""
    found, got = index["size"], index["totals"]["diff_bytes"]
    note = ("; the request is at least the lossless diff, so every value is kept"
            if found["lossless"] else "")
    print(f"--size {human(found['requested'])}: chose keep {found['keep']:.6g} in "
          f"{len(found['passes'])} passes; the diff is {human(got)} ({got:,} bytes, "
          f"{got / found['requested']:.2%} of the request){note}")


# Commands that write an output which --resume can finish.
_RESUMABLE = ("compress", "rebuild")


def _interrupted(command, exc) -> tuple[str, int]:
    """The line and exit code for a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    what = "terminated" if getattr(exc, "exit_code", 130) == 143 else "interrupted"
    if command in _RESUMABLE:
        return f"error: {what}; rerun with --resume to continue", getattr(exc, "exit_code", 130)
    return f"error: {what}", getattr(exc, "exit_code", 130)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "verify":
        # `verify BASE --finetuned FT DIFF`: argparse ends a list of positionals at the
        # first option and leaves what follows it over, where rebuild's two would take it.
        args.paths += [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    if args.command == "verify":
        _verify_paths(args)
    debug = getattr(args, "debug", False)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {printable(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = one_line_warning
        try:
            return _run(args, argv)
        except KenstreamError as exc:
            if debug:
                raise
            print(f"error: {printable(exc)}", file=sys.stderr)
            return exc.exit_code
        except BrokenPipeError:
            # The reader went away (`info --json | head -1`): nothing is wrong with the
            # run. Point stdout at /dev/null so the interpreter's final flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except OSError as exc:
            if debug:
                raise
            # An OSError that no layer turned into a KenstreamError: still one line.
            err = OutputError.from_os(exc, "I/O", file=exc.filename)
            print(f"error: {printable(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            line, code = _interrupted(args.command, exc)
            print(line, file=sys.stderr)
            return code


def entry() -> None:
    """The ``kenstream`` program: `main` with the process's signals handled.

    A Ctrl-C or SIGTERM before `main` has its own handler in place (while modules load, or
    arguments parse) still ends in one line, not a traceback; once `main` has returned
    they are ignored, so a finished run is not reported as interrupted. An exception
    that is no KenstreamError is a bug: its traceback is shown and the exit code is 3,
    never 1 (which means "verification found a mismatch").
    """
    try:
        from . import faults

        faults.install()
        code = main()
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", 130)
        print("error: terminated" if code == 143 else "error: interrupted", file=sys.stderr)
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
    except Exception:  # noqa: BLE001 - a bug: say so, with the evidence
        import traceback

        traceback.print_exc()
        print("error: internal error in kenstream (please report it with the traceback above)",
              file=sys.stderr)
        code = 3
    try:
        from . import faults

        faults.ignore_interrupts()
    except KeyboardInterrupt:
        pass
    sys.exit(code)
