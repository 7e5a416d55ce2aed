"""Selection settings and size strings: parsing and validation of what users type."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import SelectionError

METHODS = ("ken", "delta", "magnitude", "random")
"""Selection rules: the KEN rule, and the baselines it is compared with."""
TIES = ("scrambled", "positions", "values")
"""KEN tie modes (docs/algorithm.md): exact count, ties by a per-row scrambled order;
exact count, ties to the lowest position (the golden rule); every copy of a kept value."""
DEFAULT_TIES = "scrambled"
"""Default of compress: exact in count and free of the lowest-position rule's column bias
on rows with many equal values (bf16)."""

DIFF_SHARD_SIZE = "2GB"
"""Default largest diff shard."""
MODEL_SHARD_SIZE = "5GB"
"""Default largest shard of a rebuilt model (the Hugging Face convention)."""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """``'2GB'`` -> 2_000_000_000 (decimal units; KiB/MiB/GiB binary; plain bytes)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise SelectionError(f"size {text!r} is not a size such as 500MB or 2GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise SelectionError(f"size {text!r} must be positive")
    return value


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

    def __post_init__(self):
        if self.method not in METHODS:
            raise SelectionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.ties not in TIES:
            raise SelectionError(f"unknown ties mode {self.ties!r}; "
                                 f"choose one of {', '.join(TIES)}")
        if (self.k is None) == (self.keep is None):
            raise SelectionError("give exactly one of --k and --keep")
        if self.k is not None and (isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1):
            raise SelectionError(f"--k must be a whole number >= 1, got {self.k}")
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

    def wants(self, name: str) -> bool:
        """Whether tensor ``name`` is selected (else stored whole when it changed)."""
        if self.include is not None and not re.search(self.include, name):
            return False
        if self.exclude is not None and re.search(self.exclude, name):
            return False
        return True

    def to_json(self) -> dict:
        return asdict(self)
