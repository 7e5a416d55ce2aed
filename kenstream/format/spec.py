"""Names and numbers of the diff format (docs/format.md), defined once.

Pure functions and constants: file names, versions, entry names, how a tensor is cut
into rows and rows into blocks. Nothing here reads or writes.
"""

from __future__ import annotations

import math

FORMAT = "kenstream-diff"
FORMAT_VERSION = 1
"""The version this kenstream writes."""

INDEX_NAME = "kenstream-diff.json"
PARTIAL_NAME = "kenstream-diff.partial.json"
SHARD_SUFFIX = ".kdiff"
TEMP_SUFFIX = ".partial"
"""Every file is written as NAME + TEMP_SUFFIX and renamed when complete."""

ENCODINGS = ("bitmask", "indices", "dense", "unchanged")
SELECTED_ENCODINGS = ("bitmask", "indices")
REASONS = ("selected", "identical", "new", "reshaped", "excluded", "non-float")
ROLES = ("mask", "index", "counts", "values")
"""Entry roles, the suffix after ``::`` in a shard entry name."""

MAX_TENSOR_BYTES = 1 << 62
"""No record may describe more bytes in one tensor (a guard against tampered shapes)."""

MAX_COUNT = (1 << 63) - 1
"""Counts and byte totals in an index must fit a signed 64-bit integer."""

DEFAULT_BLOCK_ELEMS = 1 << 23
"""Tensors are worked through in row blocks of about this many parameters, so no
embedding-sized temporary (a boolean mask, a rebuilt tensor) is ever made whole."""


def shard_name(number: int, total: int) -> str:
    """File name of diff shard ``number`` (from 1) of ``total``."""
    return f"kendiff-{number:05d}-of-{total:05d}{SHARD_SUFFIX}"


def shard_names(count: int) -> list[str]:
    return [shard_name(i + 1, count) for i in range(count)]


def entry_name(tensor: str, role: str) -> str:
    """Shard entry name of ``role`` for ``tensor`` (``T::role``)."""
    return f"{tensor}::{role}"


def entry_owner(entry: str) -> str:
    """The tensor an entry name belongs to. Split at the last ``::``, since roles never
    hold one and tensor names may."""
    return entry.rsplit("::", 1)[0]


def rows_cols(shape) -> tuple[int, int]:
    """Rows and columns a tensor of ``shape`` is selected as (format.md 2.1).

    2-D and more: the first axis by the product of the others; 1-D: one row; 0-D: one
    row of one value.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def row_blocks(rows: int, cols: int, block_elems: int = DEFAULT_BLOCK_ELEMS):
    """(r0, r1) ranges of about ``block_elems`` parameters (at least one row each).

    Always yields at least one range: ``(0, 0)`` for a tensor without rows, and one range
    of every row for a tensor whose rows are empty (``cols == 0``: there are no parameters
    to split, and stepping through ``2**58`` empty rows would never end).
    """
    if cols == 0 or rows == 0:
        yield 0, rows
        return
    step = max(1, int(block_elems) // cols)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)
