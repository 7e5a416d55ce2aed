"""``--size``: the keep fraction that lands a diff at, or just under, a requested size.

How many bytes a keep fraction costs depends on the rule, the budget, the dtype and how
well the kept values code against the base, so the size is found by measuring: compress
at a first guess, read the diff's size, correct, and compress again until the diff is
within ``[LOW, 1] x`` the request (docs/algorithm.md section 7; :mod:`.size_search`
chooses each keep). Each pass is a whole compress into the output directory, which the
next pass replaces; a tensor or global budget's first pass (the score histograms) is made
once and reused by every pass. Each pass records the search so far in the output
(``.kenstream-size``), from which ``--resume`` takes it up at the pass a kill interrupted.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KenstreamError, OutputError, SelectionError
from ..format import spec
from ..io.checkpoint import Checkpoint
from ..io.jsonfile import read_json_file, write_json_atomic
from ..io.outputs import HOUSEKEEPING, SEARCH_NAME, read_marker, refuse_link, remove_listed
from ..progress import say
from ..settings import parse_size
from ..text import short
from .compress import compress
from .plan import SELECTABLE
from .size_search import decide

SEARCH_FORMAT = "kenstream-size"
"""The ``format`` of a search's record (``.kenstream-size``, docs/algorithm.md section 7)."""


@dataclass
class Search:
    """What ``--size`` did: the request in bytes, each pass's (keep, diff bytes), the
    keep it chose, and whether the request reached the lossless diff (keep 1)."""

    requested: int
    passes: list = field(default_factory=list)
    keep: float | None = None
    lossless: bool = False
    model: list | None = None  # the first pass's size split (`_modelled_keep`)
    steps: list | None = None  # row budget: the selected rows' lengths (`_signature`)

    def to_json(self) -> dict:
        return {"requested": self.requested, "keep": self.keep, "lossless": self.lossless,
                "passes": [list(p) for p in self.passes]}


def finetuned_bytes(finetuned) -> tuple:
    """Bytes of the fine-tune's tensors (what ``--size N%`` is a share of), and of its
    float tensors (what the first guess scales), from one read of its headers."""
    with Checkpoint.open(str(finetuned)) as f:
        infos = [f.info(n) for n in f.names()]
    return (sum(int(i.nbytes) for i in infos),
            sum(int(i.nbytes) for i in infos if i.dtype in SELECTABLE))


def parse_request(text, whole: int) -> int:
    """``'300MB'`` / ``'1.5G'`` -> bytes; ``'10%'`` -> that share of ``whole`` bytes."""
    t = str(text).strip()
    if t.endswith("%"):
        try:
            share = float(t[:-1])
        except ValueError:
            share = math.nan
        if not 0 < share <= 100:
            raise SelectionError(f"--size {short(text)} is not a share in (0%, 100%]")
        return max(1, int(whole * share / 100))
    return parse_size(t, "--size", "300MB, 1.5G or 10%", shown=text)


def compress_to_size(base, finetuned, out, size, *, quiet=False, overwrite=False,
                     resume=False, **options) -> dict:
    """Compress ``finetuned`` against ``base`` into ``out`` at the keep that lands the
    diff within [0.98, 1] x ``size`` (bytes, ``'300MB'``, ``'1.5G'`` or ``'10%'`` of the
    fine-tune's bytes); ``options`` as for :func:`compress` (not ``k`` or ``keep``).

    Returns the index, with ``"size"``: the :class:`Search` (not written to disk). Usually
    2 or 3 passes, at most ``size_search.MAX_PASSES`` (and one more to rewrite the best of
    them when none landed in the window: rows of few columns change size in steps). A request at or
    above the lossless diff keeps everything (``lossless``). Raises SelectionError when
    even the smallest keep makes a diff over the request. ``resume`` finishes a search
    that was interrupted, from the record its passes keep in ``out`` (``SEARCH_NAME``).
    """
    out = Path(out)
    refuse_link(out)  # before the search reads its record there, or clears a failed one
    whole, floats = finetuned_bytes(finetuned)
    target = parse_request(size, whole)
    search = Search(target)
    first_pass = {}
    said = {}  # keep -> the warnings of its pass, said for the keep chosen only
    mode = "overwrite" if overwrite else "fresh"  # how the next pass claims the output

    def record(running) -> dict:
        return {"format": SEARCH_FORMAT, "requested": target,
                "passes": [list(p) for p in search.passes], "model": search.model,
                "steps": search.steps, "running": running}

    def run(keep: float, how: str) -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            index = compress(base, finetuned, out, keep=keep, quiet=quiet,
                             overwrite=how == "overwrite", resume=how == "resume",
                             first_pass=first_pass, search=record(keep), **options)
        said[keep] = [str(w.message) for w in caught]
        return index

    if resume:
        mode = _resume_from(out, target, floats, size, search, quiet)
    index = None
    excluded = bool(options.get("include") or options.get("exclude"))  # named in a refusal
    while True:
        try:
            action = decide(search.passes, target, floats, size, search.model,
                            search.steps, excluded=excluded)
        except SelectionError:
            _discard(out)
            raise
        if action[0] == "done":
            break
        index = run(action[1], mode)
        mode = "overwrite"  # each later pass replaces the one before
        totals = index["totals"]
        got = totals["diff_bytes"]
        if not search.passes:
            search.model = _split(totals)
            search.steps = _steps(index, options)
        search.passes.append((action[1], got))
        say(f"--size pass {len(search.passes)}: keep {action[1]:.6g} -> {got:,} bytes "
            f"({got / target:.1%} of {target:,})", quiet)
    search.keep, search.lossless = action[1], action[2]
    if index is None:  # a finished search, resumed: its diff is checked, not rewritten
        index = run(search.keep, "resume")
    # The finished search's record stays (as the marker does): a resume then finds it done.
    write_json_atomic(out / SEARCH_NAME, record(None))
    for message in dict.fromkeys(said.get(search.keep, [])):
        # A pass's warnings speak of the --keep it ran; the user asked for a size.
        warnings.warn(message.replace(f"--keep {search.keep:g}",
                                      f"the keep --size chose, {search.keep:g},"),
                      stacklevel=2)
    return dict(index, size=search.to_json())


def _resume_from(out: Path, target: int, floats: int, size, search, quiet) -> str:
    """Take up the search recorded in ``out``: fill ``search.passes`` with its finished
    passes and return how the next pass claims the output: ``"resume"`` when the folder
    holds the running pass's plan or index; ``"overwrite"`` (the search starts again) when
    it holds neither, as after a kill between a pass's claim and its plan file; ``"fresh"``
    where no search ever started. A folder with other output and no record, or a record
    of another request, is refused and left as it is."""
    path = out / SEARCH_NAME
    if not os.path.lexists(path):
        if _holds_output(out):
            raise OutputError("--resume: holds no --size search to resume", file=out,
                              hint="finish it with the compress command that started it, "
                                   "or pass --overwrite instead of --resume")
        return "fresh"
    record = _read_search(path)
    if record["requested"] != target:
        raise OutputError(f"--resume: the search here asked for {record['requested']:,} "
                          f"bytes, this run asks for {target:,}", file=path,
                          hint="repeat the --size of the interrupted command, or pass "
                               "--overwrite instead of --resume")
    passes = [tuple(p) for p in record["passes"]]
    running, model, steps = record["running"], record.get("model"), record.get("steps")
    action = decide(passes, target, floats, size, model, steps)
    if running is None and action[0] == "done":
        running = action[1]  # finished: the index of the keep chosen must be there
    elif action != ("run", running):
        return "overwrite"  # a record this version would not have made: search again
    if (out / spec.PARTIAL_NAME).exists() or _held_keep(out) == running:
        search.passes.extend(passes)
        search.model, search.steps = model, steps
        if action[0] == "run":
            say(f"--size: resuming pass {len(passes) + 1} (keep {running:.6g})", quiet)
        return "resume"
    return "overwrite"  # nothing of the search left to build on: it starts again


def _read_search(path: Path) -> dict:
    hint = "pass --overwrite instead of --resume"
    obj = read_json_file(path, "--size record", error=OutputError, hint=hint, limit=1 << 20)
    model = obj.get("model") if isinstance(obj, dict) else None
    steps = obj.get("steps") if isinstance(obj, dict) else None
    ok = (isinstance(obj, dict) and obj.get("format") == SEARCH_FORMAT
          and (steps is None or isinstance(steps, list)
               and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                       for n in steps))
          and isinstance(obj.get("requested"), int)
          and (model is None or isinstance(model, list) and len(model) == 4
               and all(isinstance(n, int) and not isinstance(n, bool) for n in model))
          and (obj.get("running") is None or _is_keep(obj.get("running")))
          and isinstance(obj.get("passes"), list)
          and all(isinstance(p, list) and len(p) == 2 and _is_keep(p[0])
                  and isinstance(p[1], int) for p in obj["passes"]))
    if not ok:
        raise OutputError("--resume: the --size record is damaged", file=path, hint=hint)
    return obj


def _split(totals: dict) -> list | None:
    """A pass's values bytes, positions bytes, kept and selected counts (`_modelled_keep`),
    or None where its index does not split them."""
    keys = ("values_bytes", "positions_bytes", "kept", "selected")
    if not all(isinstance(totals.get(k), int) for k in keys):
        return None
    return [totals[k] for k in keys]


def _steps(index: dict, options: dict) -> list | None:
    """For a row budget, the distinct row lengths of the tensors the first pass selected
    (`_signature`); None for the tensor and global budgets, whose counts move by single
    values."""
    if options.get("budget", "row") != "row":
        return None
    return sorted({int(rec["cols"]) for rec in index["tensors"].values()
                   if rec.get("reason") == "selected" and int(rec.get("cols", 0)) > 0})


def _is_keep(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 < value <= 1


def _holds_output(out: Path) -> bool:
    """Whether ``out`` holds anything but kenstream's bookkeeping."""
    try:
        return any(p.name not in HOUSEKEEPING for p in out.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def _held_keep(out: Path):
    """The keep recorded by the index in ``out`` (None without one, or unreadable: the
    pass that meets it then says what is wrong)."""
    try:
        obj = read_json_file(out / spec.INDEX_NAME)
        return obj["selection"]["keep"]
    except (KenstreamError, KeyError, TypeError):  # absent or damaged: nothing to build on
        return None


def _discard(out) -> None:
    """Remove the diff the passes wrote (the files its marker lists, then the marker and
    the lock, then the folder if that leaves it empty): a request that cannot be met must
    not leave a complete diff of another size that looks like the answer."""
    out = Path(out)
    remove_listed(out, read_marker(out) or [])
    remove_listed(out, HOUSEKEEPING)
    try:
        os.rmdir(out)
    except OSError:
        pass  # other files of the user's stay, and the folder with them
