"""``--size``: the keep fraction that lands a diff at, or just under, a requested size.

How many bytes a keep fraction costs depends on the rule, the budget, the dtype and how
well the kept values code against the base, so the size is found by measuring: compress
at a first guess, read the diff's size, correct, and compress again until the diff is
within ``[LOW, 1] x`` the request (docs/algorithm.md section 7). Each pass is a whole
compress into the output directory, which the next pass replaces; a tensor or global
budget's first pass (the score histograms) is made once and reused by every pass. Each
pass records the search so far in the output (``.kenstream-size``), from which ``--resume``
takes it up at the pass a kill interrupted.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KenstreamError, OutputError, SelectionError
from ..format import spec
from ..io.checkpoint import Checkpoint
from ..io.jsonfile import read_json_file, write_json_atomic
from ..io.outputs import HOUSEKEEPING, SEARCH_NAME, read_marker, remove_listed
from ..progress import say
from ..settings import Settings, parse_size
from ..text import short
from .compress import compress
from .plan import SELECTABLE

LOW = 0.98
"""A pass ends the search when the diff is within [LOW, 1] times the request."""
AIM = 0.99
"""Where each correction aims, as a share of the request."""
MAX_PASSES = 8
"""Passes before the search settles for the largest diff under the request found."""
MIN_KEEP = 1e-6
"""The smallest keep tried: one value a row (row budget), almost none (others)."""
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
    m = re.fullmatch(r"([0-9.]+)\s*([kKmMgGtT])", t)
    if m:  # 1.5G: a decimal unit without its B
        t = m.group(1) + m.group(2).upper() + "B"
    return parse_size(t, "--size", "300MB, 1.5G or 10%", shown=text)


def _first_guess(floats: int, target: int) -> float:
    """A keep to start from: the request as a share of the float tensors' bytes
    ``floats``, as if a kept value cost two thirds of its raw bytes. Only a start; passes
    correct it."""
    return min(1.0, max(MIN_KEEP, 1.5 * target / max(floats, 1)))


def _entropy(p: float) -> float:
    """Bits of a yes/no choice made with probability ``p``."""
    if not 0 < p < 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _modelled_keep(keep: float, got: int, model, aim: float) -> float | None:
    """The keep at which a model of the diff's size fitted to one pass reaches ``aim``
    bytes, or None when the pass selected nothing. ``model`` is that pass's values bytes,
    positions bytes, kept and selected counts: the size is modelled as what it did not
    select (fixed), plus the values (in proportion to the keep), plus the positions (in
    proportion to the entropy of a keep-or-not choice). On the real pair this landed the
    second pass within the window 5 times in 8 where the proportional guess did 2."""
    values, positions, kept, selected = model
    if selected <= 0 or kept <= 0:
        return None
    fixed = got - values - positions
    per_value = values / kept
    choice = _entropy(kept / selected)
    per_choice = positions / (selected * choice) if choice > 0 else 0.0

    def size(k):
        return fixed + per_value * k * selected + per_choice * selected * _entropy(k)

    lo, hi = MIN_KEEP, 1.0
    if size(hi) <= aim:
        return hi
    for _ in range(60):  # bisection: the size grows with the keep up to near 1
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) < aim else (lo, mid)
    return lo


def _bracket(passes, target: int):
    """The passes nearest the request from under it and from over it (each the one of
    largest and of smallest keep), or None until there are both."""
    under = [p for p in passes if p[1] <= target]
    over = [p for p in passes if p[1] > target]
    return (max(under), min(over)) if under and over else None


def _next_keep(passes, target: int, model=None) -> float:
    """The next keep: inside the bracket of the nearest passes under and over the request
    (secant between them, bisection when that stalls), else a secant through the last two
    passes, or after one pass the keep its ``model`` (`_modelled_keep`; proportional
    without one), aiming at AIM x the request."""
    aim = AIM * target
    bracket = _bracket(passes, target)
    if bracket:
        (k0, s0), (k1, s1) = bracket
        k = k0 + (aim - s0) * (k1 - k0) / (s1 - s0) if s1 > s0 else (k0 + k1) / 2
        if not k0 < k < k1 or min(k - k0, k1 - k) < 0.05 * (k1 - k0):
            k = (k0 + k1) / 2
        return k
    (k1, s1) = passes[-1]
    k = None
    if len(passes) >= 2 and passes[-2][1] != s1 and passes[-2][0] != k1:
        k0, s0 = passes[-2]
        k = k1 + (aim - s1) * (k1 - k0) / (s1 - s0)
    elif len(passes) == 1 and model is not None:
        k = _modelled_keep(k1, s1, model, aim)
    if k is None:
        k = k1 * aim / max(s1, 1)
    if k <= 0 or not math.isfinite(k):
        k = k1 / 4 if s1 > target else k1 * 4  # every pass on one side: move on past it
    return min(1.0, max(MIN_KEEP, k))


def _signature(keep: float, steps) -> tuple | None:
    """What a row budget keeps at ``keep``: each selected row length's ``k`` (None without
    ``steps``). Two keeps of one signature make the same diff."""
    if not steps:
        return None
    settings = Settings(keep=keep)
    return tuple(settings.k_for(cols) for cols in steps)


def _unmeasured(keep: float, passes, target: int, steps) -> float | None:
    """``keep``, or where its signature is one a pass has measured already, a keep whose
    signature is new: inside the bracket of passes under and over the request (bisection
    over the signatures; None when the bracket holds none), or before there is a bracket
    the nearest keep past every pass on the side the request lies (`_next_step`). Short
    rows change ``k`` in steps, and re-running a measured signature would only repeat its
    diff."""
    seen = {_signature(p[0], steps) for p in passes}
    if _signature(keep, steps) not in seen:
        return keep
    bracket = _bracket(passes, target)
    if bracket is None:
        return _next_step(keep, passes, target, steps)
    lo, hi = bracket[0][0], bracket[1][0]
    if not lo < hi:
        return None
    low, high = _signature(lo, steps), _signature(hi, steps)
    for _ in range(60):
        mid = (lo + hi) / 2
        found = _signature(mid, steps)
        if found not in seen:
            return mid
        if found == low:
            lo = mid
        elif found == high:
            hi = mid
        else:
            return None
    return None


def _next_step(keep: float, passes, target: int, steps) -> float:
    """Before a bracket (every pass over the request, or every one under): the keep
    nearest the passes, on the side the request lies, at which ``k`` changes, found by
    bisection. Signatures grow with the keep, so every keep past that step is unmeasured.
    ``keep`` when there is no step left that way (the caller's bounds then apply)."""
    down = passes[-1][1] > target
    edge = min(p[0] for p in passes) if down else max(p[0] for p in passes)
    mark = _signature(edge, steps)
    near, far = edge, (MIN_KEEP if down else 1.0)
    if _signature(far, steps) == mark:
        return keep
    for _ in range(60):  # ``near`` keeps the edge's signature, ``far`` never does
        mid = (near + far) / 2
        near, far = (mid, far) if _signature(mid, steps) == mark else (near, mid)
    return far


def _decide(passes, target: int, floats: int, size, model=None, steps=None) -> tuple:
    """What the search does after ``passes`` (each (keep, diff bytes), in order; ``model``
    the first pass's size split, see `_modelled_keep`): ``("run", keep)`` for another
    pass, or ``("done", keep, lossless)``. A pure function of what the passes measured, so
    a resumed search decides as the uninterrupted one did. Raises SelectionError when the
    request cannot be met."""
    if not passes:
        return "run", _first_guess(floats, target)
    keep, got = passes[-1]
    if LOW * target <= got <= target:
        return "done", keep, False
    if keep >= 1.0 and got <= target:
        return "done", keep, True
    if keep <= MIN_KEEP and got > target:
        raise _below_floor(size, target, got, keep)
    if steps is not None and got > target and all(p[1] > target for p in passes):
        # A row budget keeps at least one value a row: once the smallest keep tried keeps
        # one in every row, as MIN_KEEP does, no smaller keep makes a smaller diff; with
        # nothing selected (no steps), no keep changes the diff at all.
        low = min(passes)
        if not steps or _signature(low[0], steps) == _signature(MIN_KEEP, steps):
            raise _below_floor(size, target, low[1], low[0])
    tried = [p[0] for p in passes]
    if keep in tried[:-1]:
        return "done", keep, False  # the best pass under the request, written again
    nxt = _next_keep(passes, target, model)
    if steps:  # a row budget: skip keeps whose diff a pass has measured already
        nxt = _unmeasured(nxt, passes, target, steps)
    if len(passes) < MAX_PASSES and nxt is not None and nxt not in tried:
        return "run", nxt
    # Out of passes, or between two keeps that make the same diffs: the largest under.
    under = [p for p in passes if p[1] <= target]
    if not under:
        raise SelectionError(f"--size {size}: no keep tried in {len(passes)} "
                             f"passes made a diff of at most {target:,} bytes",
                             hint="ask for a larger size")
    best = max(under, key=lambda p: p[1])
    return ("done", keep, False) if best == passes[-1] else ("run", best[0])


def _below_floor(size, target: int, got: int, keep: float) -> SelectionError:
    return SelectionError(f"--size {size} ({target:,} bytes) is below the smallest diff these "
                          f"settings make: {got:,} bytes at keep {keep:g} (the fewest values "
                          "the rule keeps, tensors stored whole, positions and the shards' "
                          "headers)", hint="ask for a larger size, or --exclude fewer tensors")


def compress_to_size(base, finetuned, out, size, *, quiet=False, overwrite=False,
                     resume=False, **options) -> dict:
    """Compress ``finetuned`` against ``base`` into ``out`` at the keep that lands the
    diff within [0.98, 1] x ``size`` (bytes, ``'300MB'``, ``'1.5G'`` or ``'10%'`` of the
    fine-tune's bytes); ``options`` as for :func:`compress` (not ``k`` or ``keep``).

    Returns the index, with ``"size"``: the :class:`Search` (not written to disk). Usually
    2 or 3 passes, at most MAX_PASSES (and one more to rewrite the best of them when none
    landed in the window: rows of few columns change size in steps). A request at or
    above the lossless diff keeps everything (``lossless``). Raises SelectionError when
    even the smallest keep makes a diff over the request. ``resume`` finishes a search
    that was interrupted, from the record its passes keep in ``out`` (``SEARCH_NAME``).
    """
    out = Path(out)
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
    while True:
        try:
            action = _decide(search.passes, target, floats, size, search.model,
                             search.steps)
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
    action = _decide(passes, target, floats, size, model, steps)
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
