"""Which keep ``--size`` runs next: a pure function of the passes measured so far
(docs/algorithm.md section 7), so a resumed search decides as the uninterrupted one did.
No I/O; :mod:`.size` runs the passes and keeps their record."""

from __future__ import annotations

import math

from ..errors import SelectionError
from ..settings import Settings
from ..text import counted

LOW = 0.98
"""A pass ends the search when the diff is within [LOW, 1] times the request."""
AIM = 0.99
"""Where each correction aims, as a share of the request."""
MAX_PASSES = 8
"""Passes before the search settles for the largest diff under the request found."""
MIN_KEEP = 1e-6
"""The smallest keep tried: one value a row (row budget), almost none (others)."""

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


def decide(passes, target: int, floats: int, size, model=None, steps=None,
           excluded: bool = False) -> tuple:
    """What the search does after ``passes`` (each (keep, diff bytes), in order; ``model``
    the first pass's size split, see `_modelled_keep`): ``("run", keep)`` for another
    pass, or ``("done", keep, lossless)``. A pure function of what the passes measured, so
    a resumed search decides as the uninterrupted one did. Raises SelectionError when the
    request cannot be met (``excluded``: some tensors are stored whole by --include or
    --exclude, which the refusal's hint then names)."""
    if not passes:
        return "run", _first_guess(floats, target)
    keep, got = passes[-1]
    if LOW * target <= got <= target:
        return "done", keep, False
    if keep >= 1.0 and got <= target:
        return "done", keep, True
    if keep <= MIN_KEEP and got > target:
        raise _below_floor(size, target, got, keep, excluded)
    if steps is not None and got > target and all(p[1] > target for p in passes):
        # A row budget keeps at least one value a row: once the smallest keep tried keeps
        # one in every row, as MIN_KEEP does, no smaller keep makes a smaller diff; with
        # nothing selected (no steps), no keep changes the diff at all.
        low = min(passes)
        if not steps or _signature(low[0], steps) == _signature(MIN_KEEP, steps):
            raise _below_floor(size, target, low[1], low[0], excluded)
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
        raise SelectionError(f"--size {size}: no keep tried in "
                             f"{counted(len(passes), 'pass')} made a diff of at most "
                             f"{target:,} bytes",
                             hint="ask for a larger size")
    best = max(under, key=lambda p: p[1])
    return ("done", keep, False) if best == passes[-1] else ("run", best[0])


def _below_floor(size, target: int, got: int, keep: float,
                 excluded: bool = False) -> SelectionError:
    hint = "ask for a larger size" + (", or --exclude fewer tensors" if excluded else "")
    return SelectionError(f"--size {size} ({target:,} bytes) is below the smallest diff these "
                          f"settings make: {got:,} bytes at keep {keep:g} (the fewest values "
                          "the rule keeps, tensors stored whole, positions and the shards' "
                          "headers)", hint=hint)
