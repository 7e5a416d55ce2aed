"""``--size``: the keep fraction that lands a diff at, or just under, a requested size.

How many bytes a keep fraction costs depends on the rule, the budget, the dtype and how
well the kept values code against the base, so the size is found by measuring: compress
at a first guess, read the diff's size, correct, and compress again until the diff is
within ``[LOW, 1] x`` the request (docs/algorithm.md section 7). Each pass is a whole
compress into the output directory, which the next pass replaces; a tensor or global
budget's first pass (the score histograms) is made once and reused by every pass.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SelectionError
from ..io.checkpoint import Checkpoint
from ..io.outputs import HOUSEKEEPING, read_marker, remove_listed
from ..progress import say
from ..settings import parse_size
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


@dataclass
class Search:
    """What ``--size`` did: the request in bytes, each pass's (keep, diff bytes), the
    keep it chose, and whether the request reached the lossless diff (keep 1)."""

    requested: int
    passes: list = field(default_factory=list)
    keep: float | None = None
    lossless: bool = False

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
            raise SelectionError(f"--size {text!r} is not a share in (0%, 100%]")
        return max(1, int(whole * share / 100))
    m = re.fullmatch(r"([0-9.]+)\s*([kKmMgGtT])", t)
    if m:  # 1.5G: a decimal unit without its B
        t = m.group(1) + m.group(2).upper() + "B"
    try:
        return parse_size(t)
    except SelectionError:
        raise SelectionError(f"--size {text!r} is not a size such as 300MB, 1.5G or 10%") \
            from None


def _first_guess(floats: int, target: int) -> float:
    """A keep to start from: the request as a share of the float tensors' bytes
    ``floats``, as if a kept value cost two thirds of its raw bytes. Only a start; passes
    correct it."""
    return min(1.0, max(MIN_KEEP, 1.5 * target / max(floats, 1)))


def _next_keep(passes, target: int) -> float:
    """The next keep: inside the bracket of the nearest passes under and over the request
    (secant between them, bisection when that stalls), else a secant through the last two
    passes (or proportional from one), aiming at AIM x the request."""
    aim = AIM * target
    under = [p for p in passes if p[1] <= target]
    over = [p for p in passes if p[1] > target]
    if under and over:
        (k0, s0), (k1, s1) = max(under), min(over)
        k = k0 + (aim - s0) * (k1 - k0) / (s1 - s0) if s1 > s0 else (k0 + k1) / 2
        if not k0 < k < k1 or min(k - k0, k1 - k) < 0.05 * (k1 - k0):
            k = (k0 + k1) / 2
        return k
    (k1, s1) = passes[-1]
    if len(passes) >= 2 and passes[-2][1] != s1 and passes[-2][0] != k1:
        k0, s0 = passes[-2]
        k = k1 + (aim - s1) * (k1 - k0) / (s1 - s0)
    else:
        k = k1 * aim / max(s1, 1)
    if k <= 0 or not math.isfinite(k):
        k = k1 / 4 if over else k1 * 4
    return min(1.0, max(MIN_KEEP, k))


def compress_to_size(base, finetuned, out, size, *, quiet=False, overwrite=False,
                     resume=False, **options) -> dict:
    """Compress ``finetuned`` against ``base`` into ``out`` at the keep that lands the
    diff within [0.98, 1] x ``size`` (bytes, ``'300MB'``, ``'1.5G'`` or ``'10%'`` of the
    fine-tune's bytes); ``options`` as for :func:`compress` (not ``k`` or ``keep``).

    Returns the index, with ``"size"``: the :class:`Search` (not written to disk). Usually
    3 to 5 passes, at most MAX_PASSES (and one more to rewrite the best of them when none
    landed in the window: rows of few columns change size in steps). A request at or
    above the lossless diff keeps everything (``lossless``). Raises SelectionError when
    even the smallest keep makes a diff over the request.
    """
    if resume:
        raise SelectionError("--size runs compress several times and cannot --resume",
                             hint="rerun the command without --resume")
    whole, floats = finetuned_bytes(finetuned)
    target = parse_request(size, whole)
    search = Search(target)
    first_pass = {}

    said = {}  # keep -> the warnings of its pass, said for the keep chosen only

    def run(keep: float) -> dict:
        done = len(search.passes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            index = compress(base, finetuned, out, keep=keep, quiet=True,
                             overwrite=overwrite or done > 0, first_pass=first_pass, **options)
        said[keep] = [str(w.message) for w in caught]
        got = index["totals"]["diff_bytes"]
        search.passes.append((keep, got))
        say(f"--size pass {done + 1}: keep {keep:.6g} -> {got:,} bytes "
            f"({got / target:.1%} of {target:,})", quiet)
        return index

    keep = _first_guess(floats, target)
    index = run(keep)
    while True:
        got = search.passes[-1][1]
        if LOW * target <= got <= target:
            break
        if keep >= 1.0 and got <= target:
            search.lossless = True
            break
        if keep <= MIN_KEEP and got > target:
            _discard(out)
            raise SelectionError(f"--size {size} ({target:,} bytes) is below the smallest "
                                 f"diff these settings make: {got:,} bytes at keep {keep:g} "
                                 "(tensors stored whole, positions and the shards' headers)",
                                 hint="ask for a larger size, or --exclude fewer tensors")
        keep = _next_keep(search.passes, target)
        if len(search.passes) >= MAX_PASSES or keep in [p[0] for p in search.passes]:
            break  # out of passes, or between two keeps that make the same diffs
        index = run(keep)
    keep, got = search.passes[-1]
    if got > target or (got < LOW * target and not search.lossless):
        under = [p for p in search.passes if p[1] <= target]
        if not under:
            _discard(out)
            raise SelectionError(f"--size {size}: no keep tried in {len(search.passes)} "
                                 f"passes made a diff of at most {target:,} bytes",
                                 hint="ask for a larger size")
        best = max(under, key=lambda p: p[1])
        if best != search.passes[-1]:
            index = run(best[0])
        keep = best[0]
    search.keep = keep
    for message in dict.fromkeys(said.get(keep, [])):
        # A pass's warnings speak of the --keep it ran; the user asked for a size.
        warnings.warn(message.replace(f"--keep {keep:g}", f"the keep --size chose, {keep:g},"),
                      stacklevel=2)
    return dict(index, size=search.to_json())


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
