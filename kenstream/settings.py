"""Selection settings and size strings: parsing and validation of what users type."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass
from fractions import Fraction

from .errors import SelectionError
from .text import short

METHODS = ("ken", "delta", "magnitude", "random")
"""Selection rules: the KEN rule, and the baselines it is compared with."""
TIES = ("scrambled", "positions", "values")
"""Tie modes of KEN, and of delta and magnitude (docs/algorithm.md 2.1, 2.2): exact count,
ties by a per-row scrambled order; exact count, ties to the lowest position (the golden
rule); every copy of a kept value. Under a tensor or global budget they choose among the
positions of the cut bin (section 6): spread evenly; in plan order; all."""
DEFAULT_TIES = "scrambled"
"""Default of compress: exact in count and free of the lowest-position rule's column bias
on rows with many equal values (bf16)."""

BUDGETS = ("row", "tensor", "global")
"""How the keep is shared (docs/algorithm.md section 6): ``row``, every row keeps its k;
``tensor``, a tensor's total keep goes to its rows by the rule's score; ``global``, the
total keep of every selected tensor goes to all of them by the score, normalised per
tensor. ``row`` is the default, and the only budget of ``ken`` (a per-row rule)."""
RANKED = ("delta", "magnitude", "random")
"""Rules whose score ranks every position, so that a budget can cross rows."""

MAX_COUNT = (1 << 63) - 1
"""The largest k and size: an index stores them as signed 64-bit counts (the format's
``spec.MAX_COUNT``; settings stay clear of the format package, which the kernels must not
load)."""

DIFF_SHARD_SIZE = "2GB"
"""Default largest diff shard."""
MODEL_SHARD_SIZE = "5GB"
"""Default largest shard of a rebuilt model (the Hugging Face convention)."""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,  # 500M, 1.5G, as --help shows
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text, what: str = "size", examples: str = "500MB or 2GB", shown=None) -> int:
    """``'2GB'`` or ``'2G'`` -> 2_000_000_000 (decimal units; KiB/MiB/GiB binary; plain
    bytes), at most 2**63 - 1 bytes (what an index can record). Errors say ``what
    {shown}`` (``shown``: ``text`` unless given) and name ``examples``."""
    shown = short(text if shown is None else shown)
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise SelectionError(f"{what} {shown} is not a size such as {examples}")
        # Exact arithmetic: a float would overflow on a 400-digit number, or round.
        value = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise SelectionError(f"{what} {shown} must be positive")
    if value > MAX_COUNT:
        raise SelectionError(f"{what} {shown} is too large: at most 2**63 - 1 bytes")
    return value


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def parse_keep(text) -> float:
    """``--keep``: a fraction (0.25) or a percentage (``'25%'``): a string, or an int, float,
    NumPy or ``fractions.Fraction`` number (``numbers.Real``; not ``Decimal``)."""
    if isinstance(text, str):
        # Decimal notation only: float() alone would also take '1_0', 'nan' and digits of
        # other scripts.
        t = text.strip()
        percent = t.endswith("%")
        number = t[:-1].rstrip() if percent else t
        if not _DECIMAL.fullmatch(number):
            raise SelectionError(f"keep {text!r} is not a fraction such as 0.25 or 25%")
        return float(number) / 100 if percent else float(number)
    if isinstance(text, bool) or not isinstance(text, numbers.Real):
        raise SelectionError(f"keep {short(text)} is not a fraction such as 0.25 or 25%")
    return float(text)


def _whole(value, what: str) -> int:
    """``value`` as an int: ints of any library, and floats such as 3.0; else an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or int(value) != value:
        raise SelectionError(f"{what} must be a whole number, got {short(value)}")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """What to keep. Exactly one of ``k`` (grid points per row) and ``keep`` (fraction of a row)."""

    method: str = "ken"
    k: int | None = None
    keep: float | None = None
    ties: str = DEFAULT_TIES
    include: str | None = None
    exclude: str | None = None
    seed: int = 0
    budget: str = "row"

    def __post_init__(self):
        if self.method not in METHODS:
            raise SelectionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.ties not in TIES:
            raise SelectionError(f"unknown ties mode {self.ties!r}; "
                                 f"choose one of {', '.join(TIES)}")
        if self.budget not in BUDGETS:
            raise SelectionError(f"unknown budget {self.budget!r}; "
                                 f"choose one of {', '.join(BUDGETS)}")
        if self.budget != "row" and self.method not in RANKED:
            raise SelectionError(f"--budget {self.budget} needs a rule that ranks positions "
                                 f"({', '.join(RANKED)}); {self.method} chooses within each "
                                 "row, so its budget is row")
        if (self.k is None) == (self.keep is None):
            raise SelectionError("give exactly one of --k and --keep")
        # Values as the index records them (JSON numbers), whatever type a caller passed.
        if self.k is not None:
            object.__setattr__(self, "k", _whole(self.k, "--k"))
        if self.keep is not None:
            object.__setattr__(self, "keep", parse_keep(self.keep))
        object.__setattr__(self, "seed", _whole(self.seed, "--seed"))
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None and not isinstance(pattern, str):
                raise SelectionError(f"{flag} must be a regular expression (a string), "
                                     f"got {short(pattern)}")
        if self.k is not None and self.k < 1:
            raise SelectionError(f"--k must be a whole number >= 1, got {self.k}")
        if not 0 <= self.seed < 1 << 64:
            # The kernels take it modulo 2**64: -1 would draw 2**64 - 1's ties, and the
            # index would record two seeds for one diff.
            raise SelectionError(f"--seed must be a whole number from 0 to 2**64 - 1, got "
                                 f"{short(self.seed)}")
        if self.k is not None and self.k > MAX_COUNT:
            raise SelectionError(f"--k must be at most 2**63 - 1, got {self.k}",
                                 hint="a k of a row's length or more keeps the row whole, "
                                      "as --keep 1 does")
        if self.keep is not None and not (0.0 < float(self.keep) <= 1.0):
            raise SelectionError(f"--keep must be a fraction in (0, 1], got {self.keep}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SelectionError(f"{flag} {pattern!r} is not a regular expression: {exc}")

    def k_for(self, cols: int) -> int:
        """Grid points for a row of ``cols`` values (at least 1)."""
        if self.k is not None:
            return int(self.k)
        return max(1, int(round(float(self.keep) * cols)))

    def target(self, rows: int, cols: int) -> int:
        """Values a tensor of ``rows`` x ``cols`` keeps in all: ``rows * min(k, cols)``
        for ``k``, ``round(keep * rows * cols)`` for ``keep`` (what a tensor or global
        budget shares out; the row budget's ``k_for`` per row)."""
        if self.k is not None:
            return rows * min(int(self.k), cols)
        return min(rows * cols, int(round(float(self.keep) * rows * cols)))

    def wants(self, name: str) -> bool:
        """Whether tensor ``name`` is selected (else stored whole when it changed)."""
        if self.include is not None and not re.search(self.include, name):
            return False
        if self.exclude is not None and re.search(self.exclude, name):
            return False
        return True

    def to_json(self) -> dict:
        """The recorded settings; ``budget`` only when not ``row``, so that diffs made
        with the default read byte for byte as before budgets existed."""
        out = asdict(self)
        if out["budget"] == "row":
            del out["budget"]
        return out
