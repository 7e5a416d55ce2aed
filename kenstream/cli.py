"""The ``kenstream`` command line: a thin ``main(argv) -> int`` over the public API (the
parser it reads ``argv`` with is :mod:`.parser`).

Known failures print one line, ``error: ...``, and exit with the error's code (2 for bad
input, 1 for a failed verification); ``--debug`` shows the traceback above that line.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from .errors import KenstreamError, OutputError
from .parser import build_parser
from .reports import human, print_info, print_verify
from .text import counted, printable

__all__ = ["build_parser", "entry", "main"]

_UNRECORDED = {"--resume": False, "--strict-resume": False, "--executor": True,
               "--ray-address": True, "--threads": True, "--quiet": False, "--debug": False}
"""Options left out of the recorded command (flag -> whether it takes a value): they change
no byte of the output, so a resumed, threaded or distributed diff stays identical to a
local whole run's."""
_UNRECORDED_SHORT = {"-j": True, "-q": False}
"""The same for short flags, as `_unbundled` leaves them: standing alone."""
_SHORT = {"j": True, "o": True, "q": False, "h": False}
"""compress's short options (letter -> whether it takes a value)."""


def _unbundled(argv) -> list:
    """``argv`` with short options split as argparse reads them: ``-qj2`` -> ``-q -j 2``,
    ``-qo DIR`` -> ``-q -o DIR``, ``-j2`` -> ``-j 2``. Anything else (``-3``, ``--x``) as
    it is."""
    out = []
    for arg in argv:
        body = arg[1:]
        if arg.startswith("--") or len(arg) <= 2 or not arg.startswith("-") \
                or body[0] not in _SHORT:
            out.append(arg)
            continue
        for i, c in enumerate(body):
            if c not in _SHORT:  # not a bundle argparse would accept
                out.append("-" + body[i:])
                break
            out.append("-" + c)
            if _SHORT[c]:
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
        if arg in _UNRECORDED_SHORT:
            skip = _UNRECORDED_SHORT[arg]
            continue
        flag = arg.split("=", 1)[0]
        known = [o for o in _UNRECORDED if len(flag) > 2 and flag.startswith("--")
                 and o.startswith(flag)]
        if len(known) == 1:  # argparse has refused an ambiguous abbreviation already
            skip = _UNRECORDED[known[0]] and "=" not in arg
            continue
        out.append(arg)
    return out


def _verb(args, index: str, plan: str) -> str:
    """'found' where ``--resume`` meets a finished output (the run writes nothing), else
    'wrote': the first word of the summary line."""
    from .io.outputs import is_complete

    return "found" if args.resume and is_complete(args.output, plan=plan, index=index) \
        else "wrote"


def _run(args, argv) -> int:
    import kenstream as ks

    if args.command == "compress":
        from .format.spec import INDEX_NAME, PARTIAL_NAME

        verb = _verb(args, INDEX_NAME, PARTIAL_NAME)
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
            print(f"{verb} {printable(args.output)}: kept {t['kept']:,} of {t['selected']:,} "
                  f"selected parameters, {human(t['diff_bytes'])} "
                  f"({t['diff_bytes'] / max(t['finetuned_bytes'], 1):.1%} of the fine-tune)")
        return 0
    if args.command == "rebuild":
        from .engine.rebuild import INDEX_NAME, PARTIAL_NAME

        verb = _verb(args, INDEX_NAME, PARTIAL_NAME)
        index = ks.rebuild(args.base, args.diff, args.output, shard_size=args.shard_size,
                           force=args.force, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet, threads=args.threads, executor=args.executor,
                           ray_address=args.ray_address)
        if not args.quiet:
            print(f"{verb} {printable(args.output)}: {len(index['weight_map'])} tensors, "
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
          f"{counted(len(found['passes']), 'pass')}; the diff is {human(got)} ({got:,} bytes, "
          f"{got / found['requested']:.2%} of the request){note}")


# Commands that write an output which --resume can finish.
_RESUMABLE = ("compress", "rebuild")


def _interrupted(command, exc) -> tuple[str, int]:
    """The line and exit code for a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    what = "terminated" if getattr(exc, "exit_code", 130) == 143 else "interrupted"
    if command in _RESUMABLE:
        return f"error: {what}; rerun with --resume to continue", getattr(exc, "exit_code", 130)
    return f"error: {what}", getattr(exc, "exit_code", 130)


def _show_traceback(debug: bool) -> None:
    """With ``--debug``, the traceback of the error being handled, above its one line: it
    is still the user's error (exit 2), not an internal one (exit 3)."""
    if debug:
        import traceback

        traceback.print_exc()


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
            _show_traceback(debug)
            print(f"error: {printable(exc)}", file=sys.stderr)
            return exc.exit_code
        except BrokenPipeError:
            # The reader went away (`info --json | head -1`): nothing is wrong with the
            # run. Point stdout at /dev/null so the interpreter's final flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except OSError as exc:
            _show_traceback(debug)
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
